"""What a stage is: ``registry`` maps ``stage.objective`` to the spec of everything that differs
between objectives (``spec.StageSpec``); ``curriculum`` names PaLI-3's stages. Nothing outside
this package branches on a stage name or an objective."""
