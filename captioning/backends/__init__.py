"""Captioning backends behind one interface (:class:`captioning.backends.base.Backend`).

Each backend module is imported only when chosen, so the oracle does not pay for torch.
"""
