"""The training loop (`iared.training.loop`): learning rate, epoch order and shards; and a tiny IA-RED²
(D = 1) video training run, killed and resumed, that ends with the same weights."""

import math

import numpy as np
import pytest
import torch

import iared
from iared.data.video import MovingFashionDataset
from iared.training.checkpointing import list_checkpoints
from iared.training.curriculum import TrainOptions, build_stages
from iared.training.loop import LoopOptions, cosine_lr, epoch_indices, run_stages, steps_per_epoch


def test_cosine_lr_hand_values():
    assert cosine_lr(0, 10, 1.0) == pytest.approx(1.0)
    assert cosine_lr(5, 10, 1.0) == pytest.approx(0.5)           # half way: (1 + cos(pi/2)) / 2
    assert cosine_lr(10, 10, 1.0) == pytest.approx(0.0)
    assert cosine_lr(10, 10, 1.0, min_ratio=0.1) == pytest.approx(0.1)
    # warmup: linear to the peak, then the cosine over the remaining steps
    assert cosine_lr(0, 12, 2.0, warmup=4) == pytest.approx(0.5)
    assert cosine_lr(3, 12, 2.0, warmup=4) == pytest.approx(2.0)
    assert cosine_lr(8, 12, 2.0, warmup=4) == pytest.approx(2.0 * 0.5 * (1 + math.cos(math.pi * 0.5)))


def test_epoch_indices_deterministic_and_epoch_dependent():
    a = epoch_indices(50, seed=3, stage=0, epoch=0)
    assert a == epoch_indices(50, seed=3, stage=0, epoch=0)
    assert sorted(a) == list(range(50))
    assert a != epoch_indices(50, seed=3, stage=0, epoch=1)
    assert a != epoch_indices(50, seed=3, stage=1, epoch=0)


def test_epoch_indices_shards_cover_data_evenly():
    shards = [epoch_indices(11, seed=0, stage=0, epoch=2, rank=r, world_size=3) for r in range(3)]
    assert {len(s) for s in shards} == {4}                       # padded to 12
    assert set().union(*map(set, shards)) == set(range(11))
    assert steps_per_epoch(11, 4, None) == 3 and steps_per_epoch(11, 4, 2) == 2


class Killed(RuntimeError):
    pass


def tiny_run(out, kill_after=None, resume=False, log=None):
    """Interpreter (5 parts) then fine-tune (1 part) on 4-frame clips; optionally die mid-run."""
    rng = np.random.default_rng(0)
    items = np.zeros((24, 28, 28), dtype=np.uint8)
    items[:, 6:22, 6:22] = rng.integers(60, 255, size=(24, 16, 16))
    train = MovingFashionDataset(items, "train", seed=0, num_frames=4, num_fragments=2)
    torch.manual_seed(0)
    model = iared.create_model("jointst_custom", img_size=48, patch_size=12, in_chans=1, num_frames=4, embed_dim=16,
                               depth=2, num_heads=2, num_classes=4)
    iared.patch(model, "iared", groups=1)
    options = TrainOptions(data="moving-fashion", checkpoint="unused", out=str(out), groups=1, epochs=3.0,
                           schedule=(5.0, 1.0), lr=1e-2, finetune_lr=1e-3, batch_size=4)
    stages = build_stages(model, train, options)
    if kill_after is not None:
        calls = {"n": 0}
        for st in stages:
            def step(m, b, g, _inner=st.step):
                calls["n"] += 1
                if calls["n"] > kill_after:
                    raise Killed("simulated kill")
                return _inner(m, b, g)
            st.step = step
    loop = LoopOptions(out=str(out), batch_size=4, limit_batches=2, checkpoint_every=3, progress=False)
    run_stages(model, stages, None, loop, resume=resume, run_config={"test": 1},
               log=(log.append if log is not None else lambda s: None))
    return model


@pytest.mark.slow
def test_killed_video_run_resumes_to_the_same_weights(tmp_path):
    reference = tiny_run(tmp_path / "a").state_dict()
    with pytest.raises(Killed):
        tiny_run(tmp_path / "b", kill_after=4)      # dies between checkpoints (3 and 6), inside policy-1
    assert list_checkpoints(tmp_path / "b"), "the killed run left no checkpoint to resume from"
    messages = []
    resumed = tiny_run(tmp_path / "b", resume=True, log=messages).state_dict()
    assert any("resuming" in m for m in messages)
    assert reference.keys() == resumed.keys()
    for k in reference:
        assert torch.equal(reference[k], resumed[k]), k
    # Training did something: weights moved away from their initialisation. (The
    # interpreter alone may not move in 2 tiny batches: it starts near keep-everything,
    # and when sampled and greedy policies are both wrong the advantage is 0.)
    torch.manual_seed(0)
    init = iared.create_model("jointst_custom", img_size=48, patch_size=12, in_chans=1, num_frames=4, embed_dim=16,
                              depth=2, num_heads=2, num_classes=4)
    iared.patch(init, "iared", groups=1)
    moved = [k for k, v in init.state_dict().items() if not torch.equal(v, reference[k])]
    assert moved, "no weight changed during training"
