"""model.template: a causal LM's instruction rows formatted by the tokenizer's chat template or a format string."""

from __future__ import annotations

import pytest

from fed.config import ConfigError, RunConfig
from fed.models import load_tokenizer
from fed.tasks import IGNORE, INSTRUCTION, CausalLM

# A chat template of our own, in the Jinja form Hugging Face tokenizers carry (nothing downloaded).
CHAT = (
    "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} </{{ m['role'] }}> {% endfor %}"
    "{% if add_generation_prompt %}<assistant> {% endif %}"
)
ROW = {"prompt": ["what is the capital of france"], "response": ["paris"]}


def _tokenizer(chat: bool):
    tokenizer = load_tokenizer("tiny-llama", "causal-lm")  # MiniLM's WordPiece: a private copy
    tokenizer.chat_template = CHAT if chat else None
    return tokenizer


def _expected(tokenizer, prompt_text: str) -> tuple[list[int], list[int]]:
    """Token ids and labels computed from the prompt text written out by hand."""
    prompt = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    response = tokenizer("paris" + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    return prompt + response, [IGNORE] * len(prompt) + response


@pytest.mark.parametrize(
    ("chat", "template", "text"),
    [
        (True, "chat", "<user> what is the capital of france </user> <assistant> "),
        (True, "auto", "<user> what is the capital of france </user> <assistant> "),
        (False, "auto", "### Instruction:\nwhat is the capital of france\n### Response:\n"),
        (True, "Q: {prompt}\nA: ", "Q: what is the capital of france\nA: "),  # a format string wins over the chat
    ],
)
def test_the_template_formats_the_prompt_and_only_the_response_is_learnt(chat, template, text):
    tokenizer = _tokenizer(chat)
    batch = CausalLM(tokenizer, 64, template).encode(ROW)
    ids, labels = _expected(tokenizer, text)
    assert batch["input_ids"][0].tolist() == ids
    assert batch["labels"][0].tolist() == labels


def test_chat_needs_a_tokenizer_with_a_chat_template():
    with pytest.raises(ValueError, match="model.template='chat'.*no chat template"):
        CausalLM(_tokenizer(chat=False), 64, "chat")


@pytest.mark.parametrize(
    ("template", "match"),
    [
        ("Q: {question}", r"exactly one field, \{prompt\} \(it has \['question'\]\)"),
        ("no field at all", r"\(it has none\)"),
        ("{prompt} and {prompt}", r"it has \['prompt', 'prompt'\]"),
        ("{prompt", "not a format string"),
    ],
)
def test_a_bad_template_is_refused_by_the_config_naming_the_key(template, match):
    with pytest.raises(ConfigError, match=match):
        RunConfig.from_flat({"task": "causal-lm", "model.template": template})


def test_the_instruct_preset_reaches_the_task_through_the_session():
    from fed.session import adapted_model

    cfg = RunConfig.from_flat({"task": "causal-lm", "model.name": "tiny-llama", "model.template": "Q: {prompt}\nA: "})
    _, task = adapted_model(cfg)
    assert isinstance(task, CausalLM) and task.template == "Q: {prompt}\nA: "
    assert INSTRUCTION.format(prompt="x") == "### Instruction:\nx\n### Response:\n"
