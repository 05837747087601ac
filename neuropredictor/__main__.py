from neuropredictor.cli import main

main()
