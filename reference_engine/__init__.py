"""A small OS2datascanner-compatible explorer and worker that follows SPEC.md.

It speaks the wire format of ENGINE_CONTRACT.md and is started like
OS2datascanner's own stages::

    python -m reference_engine.run_stage explorer|worker

It is a separate program: it never imports the ``harness`` package.
Faults can be switched on with ``REFERENCE_ENGINE_FAULTS`` (see
``python -m reference_engine.faults``).
"""
