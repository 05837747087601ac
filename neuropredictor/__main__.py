from neuropredictor.cli import app

app(prog_name="neuropredictor")
