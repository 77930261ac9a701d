"""SegIC's training-side model mechanics (no data, no Ray): several instructions per target decoded
against one neck embedding, padding slots out of the loss, queue negatives drawn from the classes a
target lists as absent, the queue as checkpointable model state, and the contract's hooks."""

from __future__ import annotations

import pytest
import torch

from refseg_models import build_model
from refseg_models.errors import ModelError
from refseg_models.modeling.inputs import EpisodeFeatures, InstructionSet
from refseg_models.modeling.segic_instructions import masks_to_boxes
from refseg_models.modeling.segic_training import InstanceFeatureQueue

SMALL = dict(input_size=128, feature_size=16, mask_down_strides=(4, 2), similarity_size=16, loss_points=256)


def model(**overrides):
    torch.manual_seed(0)
    return build_model("segic", in_channels=32, **{**SMALL, **overrides})


def instruction_batch(counts=(3, 1), n=3, seed=0, classes=None, negatives=None, reference_valid=False) -> tuple[EpisodeFeatures, torch.Tensor]:
    """B targets with ``counts`` instance instructions each (boxes at different places), padded to n."""
    g = torch.Generator().manual_seed(seed)
    b = len(counts)
    target = torch.randn(b, 32, 16, 16, generator=g)
    reference = torch.randn(b, 1, 32, 16, 16, generator=g)
    masks = torch.zeros(b, n, 1, 128, 128)
    targets = torch.full((b, n, 128, 128), 255, dtype=torch.uint8)
    for i, count in enumerate(counts):
        for j in range(count):
            masks[i, j, 0, 10 + 30 * j : 40 + 30 * j, 20:90] = 1
            targets[i, j] = 0
            targets[i, j, 15 + 30 * j : 45 + 30 * j, 30:100] = 1
    boxes = masks_to_boxes((targets == 1).flatten(0, 1).float()).view(b, n, 4)
    valid = None
    if reference_valid:
        valid = torch.ones(b, 1, 128, 128)
        valid[..., 100:, :] = 0
    instructions = InstructionSet(masks, tuple(counts), boxes, classes, negatives, valid)
    features = EpisodeFeatures(
        reference_masks=masks[:, 0], target_backbone={"patch_tokens": target},
        reference_backbone={"patch_tokens": reference}, target_boxes=boxes[:, 0], instructions=instructions,
    )
    return features, targets


def test_instructions_of_a_target_are_decoded_together_against_one_neck_pass() -> None:
    net = model(cross_instance_prompt=False).eval()  # with it, instructions see each other's tokens (below)
    features, _ = instruction_batch(counts=(3, 1))
    neck_inputs, decoded = [], []
    net.neck.register_forward_hook(lambda module, args, out: neck_inputs.append(args[0].shape[0]))
    original = net._decode

    def spy(embedding, prototypes, *args):
        decoded.append((embedding.shape[0], prototypes.shape[0]))
        return original(embedding, prototypes, *args)

    net._decode = spy
    with torch.no_grad():
        out = net(features)
    assert neck_inputs == [2]  # one neck pass over the B targets, not one per instruction
    assert decoded == [(1, 3), (1, 1)]  # each target's real instructions in one decoder call
    assert out["instruction_logits"].shape == (2, 3, 64, 64) and out["mask_logits"].shape == (2, 1, 64, 64)
    assert torch.equal(out["mask_logits"][:, 0], out["instruction_logits"][:, 0])
    assert torch.count_nonzero(out["instruction_logits"][1, 1:]) == 0  # padding slots
    assert out["instruction_prototypes"].shape == (2, 3, 1, 32)
    # instruction j decoded with the others == instruction j decoded alone
    net._decode = original
    for j in range(3):
        alone = EpisodeFeatures(
            reference_masks=features.instructions.masks[:1, j], target_backbone={"patch_tokens": features.target_backbone["patch_tokens"][:1]},
            reference_backbone={"patch_tokens": features.reference_backbone["patch_tokens"][:1]},
        )
        with torch.no_grad():
            single = net(alone)["mask_logits"][0, 0]
        assert torch.allclose(single, out["instruction_logits"][0, j], atol=1e-4)


def test_padding_instructions_are_out_of_the_loss_and_reversion_keeps_them_out() -> None:
    net = model(context_reversion=True).train()
    features, targets = instruction_batch(counts=(3, 1), reference_valid=True)
    out = net(features, generator=torch.Generator().manual_seed(0))
    reversed_pass = out["reversed"]
    assert reversed_pass["targets"].shape == (2, 3, 128, 128)
    assert reversed_pass["valid"][1, 1:].sum() == 0  # padding slots
    assert reversed_pass["valid"][0, 0, 100:].sum() == 0  # the reference has no content there
    valid = (targets != 255).float()
    torch.manual_seed(1)
    loss = net.loss(out, (targets == 1).float(), valid)["loss"]
    # the same outputs with the padding slots' logits changed: the loss does not move
    changed = dict(out, instruction_logits=out["instruction_logits"].detach().clone())
    changed["instruction_logits"][1, 1:] = 50.0
    torch.manual_seed(1)
    assert torch.allclose(net.loss(changed, (targets == 1).float(), valid)["loss"], loss.detach())
    with pytest.raises(ModelError, match="B x H x W"):
        build_model("vrp_sam", allow_random_init=True).criterion(out, (targets == 1).float(), valid)


def test_queue_negatives_come_from_the_absent_classes_and_after_step_queues_keyed_instructions() -> None:
    net = model(negative_prob=1.0, max_instructions=4).train()
    features, _ = instruction_batch(counts=(1, 2), n=2, classes=torch.tensor([[7, -1], [-1, -1]]), negatives=((3, 5), ()))
    assert net.queue_negatives(features.instructions) is None  # empty queue: nothing to draw
    net.queue.push([3, 3, 5, 9], torch.arange(4 * 32.0).view(4, 32))
    drawn = net.queue_negatives(features.instructions, generator=torch.Generator().manual_seed(0))
    assert drawn[1] is None  # lists no absent class
    stored = {tuple(row.tolist()) for row in torch.arange(4 * 32.0).view(4, 32)[:3]}
    assert drawn[0].shape == (2, 32) and {tuple(r.tolist()) for r in drawn[0]} <= stored  # classes 3 and 5, never 9
    out = net(features)
    assert [n.shape[0] for n in out["negative_mask_logits"]] == [2, 0]
    before = len(net.queue)
    net.after_step(out, features)
    assert len(net.queue) == before + 1 and net.queue.size(7) == 1  # only the keyed (semantic) instruction
    assert torch.allclose(net.queue._queues[7][0], out["instruction_prototypes"][0, 0, 0].detach())
    # max_instructions bounds positives + negatives
    full = model(negative_prob=1.0, max_instructions=2).train()
    full.queue.push([3, 5], torch.randn(2, 32))
    assert full.queue_negatives(features.instructions)[0].shape[0] == 1


def test_queue_is_extra_state_and_restores_exactly() -> None:
    net = model()
    assert net.ddp_find_unused_parameters and build_model("vrp_sam", allow_random_init=True).extra_state() is None
    for step in range(300):  # more than max_per_class for class 1: FIFO order matters
        net.queue.push([step % 3], torch.full((1, 32), float(step)))
    state = net.extra_state()
    fresh = model()
    fresh.load_extra_state(state)
    assert fresh.queue.classes == net.queue.classes and len(fresh.queue) == len(net.queue) == 3 * 100
    for c in net.queue.classes:
        assert torch.equal(torch.stack(list(fresh.queue._queues[c])), torch.stack(list(net.queue._queues[c])))
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(net.queue.sample_from([0, 1], 2, g1), fresh.queue.sample_from([0, 1], 2, g2))
    # a checkpoint round trip (weights_only) keeps it
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    again = model()
    again.load_extra_state(torch.load(buffer, weights_only=True))
    assert len(again.queue) == 300
    with pytest.raises(ModelError, match="no negative queue"):
        model().load_extra_state(None)
    with pytest.raises(ModelError, match="keeps no extra training state"):
        build_model("vrp_sam", allow_random_init=True).load_extra_state({"x": 1})


def test_queue_memory_is_linear_in_its_contents() -> None:
    queue = InstanceFeatureQueue(max_per_class=8)
    queue.push(list(range(10)) * 20, torch.randn(200, 64))
    assert len(queue) == 80 and queue.nbytes() == 80 * 64 * 4


def test_instruction_sets_are_validated_moved_and_selected() -> None:
    features, _ = instruction_batch(counts=(3, 1), classes=torch.tensor([[1, 2, 3], [4, -1, -1]]), negatives=((9,), (8, 7)))
    sub = features.select([1])
    assert sub.instructions.counts == (1,) and sub.instructions.negative_classes == ((8, 7),)
    assert torch.equal(sub.instructions.classes, torch.tensor([[4, -1, -1]]))
    assert features.to("cpu", torch.float64).instructions.masks.dtype == torch.float64
    with pytest.raises(ModelError, match="counts"):
        InstructionSet(features.instructions.masks, (4, 1)).validate(2, 1, 128, 128)
    with pytest.raises(ModelError, match="InstructionSet.masks"):
        EpisodeFeatures(reference_masks=torch.zeros(2, 1, 64, 64), instructions=features.instructions)


def _authors_process_cross_inst_prompt(prompt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Transcribed from MengLcool/SEGIC model/segic.py ``process_cross_inst_prompt`` (lines 1029-1039);
    ``prompt``: (n_inst, n_p, c)."""
    n_inst, n_p = prompt.shape[:2]
    prompt_cinst = prompt.flatten(0, 1)[None].expand(n_inst, -1, -1)
    prompt_type_cinst = prompt_cinst.new_zeros(n_inst, n_inst, n_p, dtype=torch.long)
    prompt_type_cinst[range(n_inst), range(n_inst)] = 1
    prompt_type_cinst = prompt_type_cinst.flatten(1, 2)
    return prompt_cinst, prompt_type_cinst


def _authors_cross_prompt(net, prototypes: torch.Tensor) -> torch.Tensor:
    # model/segic.py lines 692-695: the projected instance features, cross-instanced, + inst_type_embed
    prompt, types = _authors_process_cross_inst_prompt(net.visual_instruction(prototypes))
    return prompt + net.instance_type_embed(types)


def _sparse_prompts(net) -> list[torch.Tensor]:
    """The sparse prompts the mask decoder receives, one entry per decoder call."""
    seen: list[torch.Tensor] = []
    net.mask_decoder.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["sparse_prompt_embeddings"].detach()), with_kwargs=True
    )
    return seen


def test_cross_instance_prompt_is_the_authors_at_inference_with_negatives_too() -> None:
    net = model().eval()
    assert net.config.cross_instance_prompt and net.instance_type_embed is not None
    features, _ = instruction_batch(counts=(3, 1))
    seen = _sparse_prompts(net)
    g = torch.Generator().manual_seed(3)
    negatives = [torch.randn(2, 32, generator=g), None]
    with torch.no_grad():
        out = net(features, negative_prototypes=negatives)
        prototypes = out["instruction_prototypes"]  # B x n x k x C, k = 1
        # target 0: 3 positives then 2 negatives, every prompt holds all 5 instructions' tokens
        together = torch.cat([prototypes[0, :3], negatives[0][:, None]])
        expected = _authors_cross_prompt(net, together)  # 5 x 5 x 256
        expected_single = _authors_cross_prompt(net, prototypes[1, :1])  # target 1: its one instruction
    positives, negs, single = seen
    torch.testing.assert_close(positives[:, -5:], expected[:3])
    torch.testing.assert_close(negs[:, -5:], expected[3:])
    torch.testing.assert_close(single[:, -1:], expected_single)
    # the type embedding marks each instruction's own token (1) among the others' (0)
    assert not torch.allclose(positives[0, -5:], positives[1, -5:])


def test_cross_instance_prompt_is_drawn_with_p_half_per_target_in_training() -> None:
    net = model(context_reversion=False).train()
    features, _ = instruction_batch(counts=(1,), n=1)
    seen = _sparse_prompts(net)
    crossed = 0
    for seed in range(24):
        out = net(features, generator=torch.Generator().manual_seed(seed))
        plain = net.visual_instruction(out["instruction_prototypes"][0, :1]).detach()  # 1 x 1 x 256
        last = seen[-1][:, -1:]
        if torch.allclose(last, plain + net.instance_type_embed.weight[1].detach()):
            crossed += 1
        else:
            torch.testing.assert_close(last, plain)
    assert 6 <= crossed <= 18  # the authors' random.random() > 0.5 per target
