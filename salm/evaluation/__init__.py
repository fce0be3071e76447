"""Evaluation: tasks as data (``tasks``), answer extraction (``scoring``), Wilson intervals (``stats``),
the runner comparing the ensemble with each member (``runner``; its steps: ``settings``, ``inputs``,
``generations``, ``modes``), routing and teacher-forced oracle analysis (``analysis``) and the written
reports (``reports``). Submodules import lazily: scoring needs no torch."""
