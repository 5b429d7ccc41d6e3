"""Tensors from two devices meeting: the server keeps masks on the CPU while a client's or the
server's model may sit on a GPU. The ``meta`` device stands in for the GPU here: it raises the same
device-mismatch error as CUDA does (found on an H200: the supernet's evaluation after the first masks)."""

import torch

from fedmetanas_core.space.model import RelaxSettings, relax_or_onehot
from fedmetanas_core.space.relaxation import relax

MASK = torch.tensor([[True, False, True, True], [False, True, True, False]])  # on the CPU, as the server holds it


def test_relaxed_weights_take_a_cpu_mask_on_another_device():
    weights = relax(torch.zeros(2, 4, device="meta"), 1.0, "softmax", MASK)
    assert weights.device.type == "meta" and weights.shape == (2, 4)
    cpu = relax(torch.zeros(2, 4), 1.0, "softmax", MASK)
    assert torch.equal(cpu == 0, ~MASK)  # masked entries exactly zero


def test_argmax_choice_takes_a_cpu_mask_on_another_device():
    settings = RelaxSettings(tau=1.0, mode="gumbel-soft", noise=False, threshold=0.0, argmax=True)
    assert relax_or_onehot(torch.zeros(2, 4, device="meta"), settings, MASK, None).device.type == "meta"
    logits = torch.tensor([[0.0, 9.0, 1.0, 0.0], [5.0, 0.0, 1.0, 9.0]])
    chosen = relax_or_onehot(logits, settings, MASK, None).argmax(-1)
    assert chosen.tolist() == [2, 2]  # the best op the mask keeps, not the masked-out favourite
