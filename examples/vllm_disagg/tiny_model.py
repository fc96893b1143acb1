"""Build a tiny random-weight Llama with a byte-level tokenizer, for trying PD disaggregation without a download."""
from __future__ import annotations

import argparse
import json
import os


def build_tiny_llama(out_dir: str, seed: int = 1234, num_layers: int = 2, hidden: int = 128, heads: int = 4,
                     kv_heads: int = 2, max_positions: int = 8192, sliding_window: int = 0) -> str:
    """Write a random Llama (fixed seed) and a byte-level tokenizer into ``out_dir``; idempotent.

    Args:
        out_dir: target folder (created when missing).
        seed: seed of the random weights; one seed gives the same model everywhere.
        num_layers: decoder layers.
        hidden: hidden size (``hidden / heads`` must be a head size the CPU attention supports: 32, 64, 80, ...).
        heads: attention heads.
        kv_heads: key/value heads.
        max_positions: longest sequence the model accepts.
        sliding_window: when > 0, even layers attend to the last ``sliding_window`` tokens only and odd layers to
            all (a hybrid model: vLLM gives the two kinds separate KV cache groups).

    Returns:
        ``out_dir``.
    """
    marker = os.path.join(out_dir, "tiny_model.json")
    wanted = {"seed": seed, "num_layers": num_layers, "hidden": hidden, "heads": heads, "kv_heads": kv_heads,
              "max_positions": max_positions}
    if sliding_window:
        wanted["sliding_window"] = sliding_window
    if os.path.exists(marker):
        with open(marker, encoding="utf-8") as handle:
            if json.load(handle) == wanted:
                return out_dir
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    os.makedirs(out_dir, exist_ok=True)
    vocab = {f"<{i}>": i for i in range(256)}
    vocab.update({"<s>": 256, "</s>": 257, "<unk>": 258})
    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab.update({ch: 259 + i for i, ch in enumerate(sorted(byte_chars)) if ch not in vocab})
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.ByteLevel(add_prefix_space=False),
                                                      pre_tokenizers.Split("", "isolated")])
    tokenizer.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(out_dir)

    config = LlamaConfig(vocab_size=max(512, len(vocab)), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=num_layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=max_positions, bos_token_id=256, eos_token_id=257,
                         tie_word_embeddings=False, torch_dtype="float32")
    if sliding_window:
        config.sliding_window = sliding_window
        config.layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)]
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.5 / hidden ** 0.5 * 8)
    model.save_pretrained(out_dir, safe_serialization=True)
    with open(marker, "w", encoding="utf-8") as handle:
        json.dump(wanted, handle)
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--sliding-window", type=int, default=0,
                        help="tokens of a sliding window on even layers (a hybrid model); 0: full attention only")
    args = parser.parse_args()
    print(build_tiny_llama(args.out_dir, args.seed, args.layers, args.hidden, args.heads, args.kv_heads,
                           sliding_window=args.sliding_window))


if __name__ == "__main__":
    main()
