"""Evaluation helpers: answer extraction/scoring (``scoring``) and accuracy statistics (``stats``)."""
