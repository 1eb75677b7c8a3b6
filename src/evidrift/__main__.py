"""``python -m evidrift`` (also what ``torchrun -m evidrift`` runs)."""

from evidrift.cli.app import app

if __name__ == "__main__":
    app()
