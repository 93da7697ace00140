"""Context templates: greedy from the seed words, or (the reference preset) under the model's own generation
config, seeded, so a sampling model's templates are reproducible."""
import pytest


@pytest.mark.model
def test_templates_follow_the_models_generation_config_seeded(tiny_model_dir):
    from memoir_vllm.config import preset
    from memoir_vllm.editor import generate_templates
    from memoir_vllm.models import load_model

    model, tok = load_model(str(tiny_model_dir))
    greedy = generate_templates(model, tok)
    assert len(greedy) == 10 and greedy[0].startswith("I") and greedy[4].startswith("Q: ")
    assert generate_templates(model, tok, decoding="model") == greedy  # its config does not sample
    model.generation_config.do_sample, model.generation_config.temperature = True, 0.6
    model.generation_config.top_p = 0.9
    try:
        sampled = generate_templates(model, tok, decoding="model", seed=1)
        assert sampled == generate_templates(model, tok, decoding="model", seed=1) != greedy
        assert sampled != generate_templates(model, tok, decoding="model", seed=2)
    finally:
        model.generation_config.do_sample = False
    assert preset("reference").template_decoding == "model"
    sampled = generate_templates(model, tok, decoding="sample", seed=1)  # whatever the config says, seeded
    assert sampled == generate_templates(model, tok, decoding="sample", seed=1) != greedy
    with pytest.raises(ValueError, match="template decoding 'beam'"):
        generate_templates(model, tok, decoding="beam")
