"""Training set-up (`iared.training.setup`): the agreement target relabels the data with the
unreduced backbone."""

import torch


DATA = "cluttered-digits"


def test_agreement_target_relabels_with_the_unreduced_backbone(tmp_path, backbone):
    from iared.training.setup import relabel, with_teacher_labels
    from iared.training.curriculum import load_backbone

    model, _, _, _, val = load_backbone(str(backbone), None, DATA)
    labelled = relabel(val, model, limit=6, batch_size=4)
    assert len(labelled) == 6
    images = torch.stack([val[i]["image"] for i in range(6)])
    assert [labelled[i]["label"] for i in range(6)] == model(images).argmax(-1).tolist()
    seen = {}
    step = with_teacher_labels(model)(lambda m, b, g: seen.update(b) or {})
    step(None, {"image": images, "label": torch.full((6,), -1)}, None)
    assert seen["label"].tolist() == model(images).argmax(-1).tolist()
