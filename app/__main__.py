"""`python -m app [uvicorn options]`: the server, as `spamgpt serve` runs it (app.cli.serve)."""

import sys

from app.cli import serve

serve(sys.argv[1:], prog="python -m app")
