"""Training side (torch): learn tasks one after another with a continual-learning method and hand the model over as a
`PackedModel` for the artifact.

Importing this package is light; torch loads with the modules that need it. Torch-free: `registry` (method names and
config classes), `methods/*_config` (each method's validated config), `data` (streams), `compute` (device, threads),
`outputs` (results.json, heatmap), `state` (training state beside an artifact), `pipeline` (its top level: it checks a
request before importing torch). With torch: `protocol` (the one method protocol), `engine` (the learn-evaluate loop),
`models` (forward pass from an `Arch`), `projections`, `distributed` (training on N ranks with torch.distributed), and
`methods/<name>` (one method per file).
"""

__all__ = ["compute", "data", "distributed", "engine", "models", "outputs", "pipeline", "projections", "protocol",
           "registry", "state"]
