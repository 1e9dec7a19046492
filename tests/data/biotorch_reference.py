"""Reference outputs of biotorch's own LeNet and CIFAR ResNet modules, for tests/test_zoo.py.

Run once in an environment with PyTorch, pointing at biotorch's sources (the 0.0.16 sdist or
jsalbert/biotorch commit 74fad0dd32529e754e4bba8298d4e0fd0a06a886):

    python tests/data/biotorch_reference.py /path/to/biotorch-0.0.16

It fills every weight and BatchNorm buffer with :func:`values` (NumPy only, so the test can
rebuild the same weights without PyTorch), runs a fixed batch in eval and in train mode and
writes the logits and the updated running statistics to ``biotorch_reference.npz``.
"""

import importlib.util
import pathlib
import sys
import zlib

import numpy as np

# name in MODELS → (biotorch file, constructor given the file's module, input shape NCHW)
NETWORKS = {
    "lenet5": ("le_net.py", lambda m: m.LeNetMNIST(), (2, 1, 32, 32)),
    "lenet_cifar": ("le_net.py", lambda m: m.LeNetCIFAR(), (2, 3, 32, 32)),
    "resnet14": ("small_resnet.py", lambda m: m.ResNet(m.BasicBlock, [2, 2, 2]), (4, 3, 32, 32)),
}


def values(network: str, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """The value of biotorch's tensor ``name`` (PyTorch layout), seeded by its name."""
    rng = np.random.default_rng(zlib.crc32(f"{network}/{name}".encode()))
    if name.endswith("running_var"):
        return rng.uniform(0.5, 1.5, shape).astype(np.float32)
    if name.endswith("weight") and len(shape) > 1:
        return (rng.standard_normal(shape) * np.sqrt(2 / np.prod(shape[1:]))).astype(np.float32)
    if name.endswith("weight"):  # BatchNorm scale
        return (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    return (0.1 * rng.standard_normal(shape)).astype(np.float32)


def inputs(network: str) -> np.ndarray:
    shape = NETWORKS[network][2]
    return np.random.default_rng(zlib.crc32(network.encode())).standard_normal(shape).astype(
        np.float32)


def main(biotorch_root: str) -> None:
    import torch

    out = {}
    for network, (filename, constructor, _) in NETWORKS.items():
        path = pathlib.Path(biotorch_root) / "biotorch" / "models" / filename
        spec = importlib.util.spec_from_file_location(path.stem, path)
        m = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(m)
        model = constructor(m)
        state = {k: v for k, v in model.state_dict().items() if "num_batches" not in k}
        model.load_state_dict({k: torch.from_numpy(values(network, k, tuple(v.shape)))
                               for k, v in state.items()}, strict=False)
        x = torch.from_numpy(inputs(network))
        with torch.no_grad():
            out[f"{network}/eval"] = model.eval()(x).numpy()
            out[f"{network}/train"] = model.train()(x).numpy()
        for k, v in model.state_dict().items():
            if "running" in k:
                out[f"{network}/after_train/{k}"] = v.numpy()
        out[f"{network}/names"] = np.array(list(state))
        for k, v in state.items():
            out[f"{network}/shape/{k}"] = np.array(v.shape)
    np.savez_compressed(pathlib.Path(__file__).with_suffix(".npz"), **out)


if __name__ == "__main__":
    main(sys.argv[1])
