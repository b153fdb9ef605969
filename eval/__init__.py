"""Evaluators (imported as `ssl_vit.eval`): frozen features, linear probe, k-NN, fine-tune, compare.

They never import the training engine or the objectives (see STYLE.md), so an evaluation protocol is
the same whatever produced the backbone.
"""
