"""Entry points: ``run.py`` trains one stage, ``curriculum.py`` runs stages in sequence."""
