"""`python -m prunery.worker [celery worker options]`: one Prunery worker, configured from PRUNERY_* variables."""

from .app import main

if __name__ == "__main__":
    main()
