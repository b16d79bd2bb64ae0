"""``engine.noise.fill_normal``: cache-sized ``normal_`` chunks on the CPU, bitwise ``torch.randn``'s numbers.

The engine's noise stream (and VI's draws) go through it, so a state's future must not depend on the
chunking: every size around the chunk boundaries, both float dtypes, a chained buffer, and the global
generator give exactly one ``randn`` call's numbers. The check would fail on a wrong answer: a chunk
boundary that is not a multiple of 16, or a last chunk shorter than 16, changes the numbers (shown).
"""

from __future__ import annotations

import pytest
import torch

from bayesflow.engine.noise import NORMAL_CHUNK, NoiseStream, fill_normal


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 15, 16, 17, 2 * NORMAL_CHUNK - 1, 2 * NORMAL_CHUNK, 2 * NORMAL_CHUNK + 1,
                               3 * NORMAL_CHUNK + 15, 5 * NORMAL_CHUNK + 17, 1_000_003])
def test_chunks_draw_the_numbers_of_one_randn_call(n, dtype):
    drawn = fill_normal(torch.empty(n, dtype=dtype), torch.Generator().manual_seed(n))
    assert torch.equal(drawn, torch.randn(n, dtype=dtype, generator=torch.Generator().manual_seed(n)))


def test_global_generator_shaped_buffers_and_the_engine_stream():
    torch.manual_seed(3)
    drawn = fill_normal(torch.empty(4, NORMAL_CHUNK), None)   # any contiguous shape: memory order
    torch.manual_seed(3)
    assert torch.equal(drawn.reshape(-1), torch.randn(4 * NORMAL_CHUNK))
    like = [torch.empty(3 * NORMAL_CHUNK + 5), torch.empty(7, 11)]
    stream = NoiseStream(torch.device("cpu"))
    key = stream.initial_state(11)
    stream.begin(key, step=4)
    buffer, _ = stream.normal(like, "params")
    generator = stream.generators[0]
    stream.begin(key, step=4)   # reseeds the same generator: one randn of the whole buffer
    assert torch.equal(buffer, torch.randn(buffer.numel(), generator=generator))


def test_the_check_tells_a_wrong_chunking_apart():
    n = 3 * NORMAL_CHUNK
    reference = torch.randn(n, generator=torch.Generator().manual_seed(0))
    for first in (NORMAL_CHUNK + 8, n - 5):   # not a multiple of 16; a last chunk of 5
        wrong = torch.empty(n)
        generator = torch.Generator().manual_seed(0)
        wrong[:first].normal_(generator=generator)
        wrong[first:].normal_(generator=generator)
        assert not torch.equal(wrong, reference)
