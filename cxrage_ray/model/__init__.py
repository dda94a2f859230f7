"""The CXR-Age model: its network, its checkpoints and where they come from.

In:  a weights file (the published fastai v1 `learn.save` file, or safetensors), or a registry id.
Out: a verified state dict (`checkpoint.load_state_dict`: restricted unpickling, sha256), the network built from
     it (`network.build_model`, `network.calibrate`), the registry of published weights with their sha256 and
     download (`registry`), and seeded demo weights in the published format (`demo`).
"""
