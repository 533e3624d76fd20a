"""The tools' side: what ``tools/*.py`` (and the demo, and tests) call.

Command-line plumbing (:mod:`.launch`: config loading, work dir, CPU
distributed set-up, the hooks kiv's ``tools/train.py`` adds, ``die()``
which exits the process), the test data root (:mod:`.data_root`), the test
summary table (:mod:`.summary`) and the student export
(:mod:`.export`). Nothing in ``kiv.engine`` or below imports this package.
"""
