"""gb10exp's Ray launcher for Hydra (``hydra/launcher=ray_cluster`` and ``ray_local``): see ``_core``.

It lives under ``hydra_plugins`` because Hydra instantiates launchers only from that namespace. Hydra imports
this package and its public modules on every start, so nothing here imports Ray: ``_core`` does, when a
sweep is checked or launched.
"""
