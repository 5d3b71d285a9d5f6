"""A tiny random Qwen2 causal LM with a byte-level BPE tokenizer and a ChatML chat template,
made offline inside the tests (no hub, no download): the shape of the embedded generator
(Qwen2.5, its default system turn, ``<|im_end|>`` ending each turn) at a few thousand
parameters, for the SFT and export tests.

>>> folder = make_tiny_model(tmp_path / "tiny")      # doctest: +SKIP
>>> AutoModelForCausalLM.from_pretrained(folder)     # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["CHAT_TEMPLATE", "SPECIAL_TOKENS", "make_tokenizer", "make_tiny_model", "write_tiny_gguf"]

#: Qwen2.5's structure: a default system turn, ``<|im_start|>role\\ncontent<|im_end|>\\n``.
CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_CORPUS = [
    "Write guidelines for labelling the input. Input: the film was great. Label: positive.",
    "Read the input and assign it the label that fits it best. Only return one of these options.",
    "Decide whether the review praises or criticises the film; answer negative or positive.",
    "Report 12: the sky over town 3 looks sunny, rainy or snowy today.",
]


def make_tokenizer(vocab_size: int = 320):
    """A byte-level BPE (any text encodes) trained on a few sentences, as a transformers
    fast tokenizer with the chat template and ``<|im_end|>`` as end of turn."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS * 5, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHAT_TEMPLATE
    )


def make_tiny_model(folder: Path, *, seed: int = 0, layers: int = 2, hidden: int = 32) -> Path:
    """Save a random tiny Qwen2ForCausalLM (untied output layer, like the GGUF) and its
    tokenizer into ``folder``; returns it."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = make_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_tiny_gguf(model_folder: Path, path: Path) -> Path:
    """Write the tiny model of ``model_folder`` as a GGUF file the way llama.cpp lays one out
    (architecture ``qwen2``, llama.cpp tensor names, a ``gpt2``-model BPE vocabulary with
    its merges, the chat template), in f32: what ``from_pretrained(folder, gguf_file=...)``
    loads through transformers' GGUF path, as it loads the embedded generator."""
    import json

    import gguf
    from safetensors.torch import load_file

    config = json.loads((model_folder / "config.json").read_text())
    tokenizer = json.loads((model_folder / "tokenizer.json").read_text())
    template = json.loads((model_folder / "tokenizer_config.json").read_text()).get("chat_template")
    if not template and (model_folder / "chat_template.jinja").is_file():
        template = (model_folder / "chat_template.jinja").read_text()
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), "qwen2")
    layers = config["num_hidden_layers"]
    writer.add_block_count(layers)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_rope_freq_base(float(config.get("rope_theta") or (config.get("rope_parameters") or {}).get(
        "rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    vocab = tokenizer["model"]["vocab"]
    added = {t["content"]: t["id"] for t in tokenizer["added_tokens"]}
    size = max([*vocab.values(), *added.values()]) + 1
    tokens, types = [""] * size, [gguf.TokenType.NORMAL] * size
    for token, index in vocab.items():
        tokens[index] = token
    for token, index in added.items():
        tokens[index], types[index] = token, gguf.TokenType.CONTROL
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in tokenizer["model"]["merges"]])
    writer.add_eos_token_id(added["<|im_end|>"])
    writer.add_pad_token_id(added["<|endoftext|>"])
    writer.add_bos_token_id(added["<|endoftext|>"])
    writer.add_add_bos_token(False)
    writer.add_chat_template(template)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, layers)
    for name, tensor in load_file(str(model_folder / "model.safetensors")).items():
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), tensor.float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
