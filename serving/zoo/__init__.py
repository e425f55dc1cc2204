"""The model zoo: trained models kept in the repository (``zoo/<name>/``) as weights-only checkpoints with their
spec as plain data, a model card (``card.json`` + ``card.md``) and its plots; ``robustserve zoo`` lists, shows,
exports, serves, verifies and adds them (:mod:`serving.zoo.commands`)."""
