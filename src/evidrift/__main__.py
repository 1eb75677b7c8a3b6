"""``python -m evidrift`` (also what ``torchrun -m evidrift`` runs)."""

from evidrift.cli import app

if __name__ == "__main__":
    app()
