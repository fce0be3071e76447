"""The seed's import paths (``from src.architecture import ...``), kept as thin re-exports of ``salm``."""
