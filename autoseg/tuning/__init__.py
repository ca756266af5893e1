"""The parts of ``autoseg tune`` (the command's loop is :mod:`autoseg.commands.tune`): the search space
(:mod:`.space`), the objective, a :mod:`autoseg.workflows.fold` run per trial (:mod:`.objective`), and the
study with its storages and reports (:mod:`.study`)."""
