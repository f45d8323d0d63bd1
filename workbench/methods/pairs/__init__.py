"""Methods of the ``pairs`` family: contrastive fine-tuning on image–text pairs (see :mod:`workbench.methods.registry`)."""
