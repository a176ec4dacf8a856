"""Training recipes for the pack's default model family (autoencoder, text-to-image UNet).

The older training CLIs (``jointcore.train_e2e``, ``jointcore.train_jointnet``, ``jointcore.train_diff2in1``)
stay where they are; new recipes live here. Every CLI runs unchanged as ``python -m …`` and under
``accelerate launch -m …``.
"""
