"""`python -m covidsearch` is the covidsearch command."""
from .cli import command

command()
