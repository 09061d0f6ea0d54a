"""``python -m deo_cli`` runs the ``deo`` command line (also what ``torchrun -m deo_cli`` starts)."""

from deo_cli.cli.app import main

if __name__ == "__main__":
    main()
