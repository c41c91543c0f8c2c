"""Wan's text encoder: the UMT5-XXL encoder run through ``transformers.UMT5EncoderModel``.

Official Wan T5 is UMT5: a relative position bias in every layer (32 bidirectional buckets, max
distance 128), gated GELU(tanh) FFN, RMS norms, no 1/sqrt(d) attention scaling. ``UMT5EncoderModel``
computes exactly that, so only the tensor names differ; ``official_t5_key_to_hf`` maps them.

Weights come from local files only: the official ``models_t5_umt5-xxl-enc-bf16.pth`` or a
Diffusers ``text_encoder/`` folder. Tokenizers come from local folders only, never the hub.
"""

from __future__ import annotations

import html
import json
import re
from collections import OrderedDict
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase, UMT5Config, UMT5EncoderModel

from smartdiff.pipeline.config import T5Config
from smartdiff.pipeline.loading import CheckpointError, read_safetensors, read_weights, require_file
from smartdiff.pipeline.memory import BlockStreamer

try:  # Wan cleans prompts with ftfy; without it we still do the html/whitespace part.
    import ftfy
except ImportError:  # pragma: no cover - depends on the environment
    ftfy = None

# The input embedding has two names in UMT5EncoderModel (tied parameters); the official file and
# HF's own saved files store it once, as the first name.
EMBEDDING_KEY = "shared.weight"
EMBEDDING_ALIAS = "encoder.embed_tokens.weight"

# --- model -------------------------------------------------------------------------------------


def build_text_encoder(config: T5Config) -> UMT5EncoderModel:
    """An encoder-only UMT5 on the meta device, in eval mode, ready for ``loading.assign_weights``.

    Its ``state_dict()`` lists the tied embedding once (``shared.weight``); loading re-creates the
    alias, so a strict assign materialises the 256384x4096 table only once.
    """
    hf_config = UMT5Config(
        vocab_size=config.vocab_size,
        d_model=config.d_model,
        d_ff=config.d_ff,
        d_kv=config.d_kv,
        num_layers=config.num_layers,
        num_heads=config.num_heads,
        relative_attention_num_buckets=config.relative_attention_num_buckets,
        relative_attention_max_distance=config.relative_attention_max_distance,
        feed_forward_proj="gated-gelu",  # gate = GELU(tanh) ("gelu_new"), as in Wan's T5FeedForward
        dense_act_fn="gelu_new",
        is_encoder_decoder=False,
        # UMT5 has no tied LM head (google/umt5-xxl says False); the encoder's embed_tokens is
        # always the same parameter as `shared`, whatever this flag says.
        tie_word_embeddings=False,
        dropout_rate=0.0,
        layer_norm_epsilon=1e-6,
        pad_token_id=0,
        eos_token_id=1,
        use_cache=False,
    )
    with torch.device("meta"):
        model = UMT5EncoderModel(hf_config)
    model.eval().requires_grad_(False)
    model.register_state_dict_post_hook(_drop_embedding_alias)
    model.register_load_state_dict_pre_hook(_add_embedding_alias)
    model.register_load_state_dict_post_hook(_retie_embedding)
    return model


def _drop_embedding_alias(module, state_dict, prefix, local_metadata) -> None:
    state_dict.pop(prefix + EMBEDDING_ALIAS, None)


def _add_embedding_alias(module, state_dict, prefix, *args) -> None:
    # The same tensor object under both names: no copy, and strict loading sees every parameter.
    if prefix + EMBEDDING_KEY in state_dict and prefix + EMBEDDING_ALIAS not in state_dict:
        state_dict[prefix + EMBEDDING_ALIAS] = state_dict[prefix + EMBEDDING_KEY]


def _retie_embedding(module, incompatible_keys) -> None:
    # load_state_dict(assign=True) wraps each name in its own Parameter; make it one again so a
    # later .to(device) moves one table, not two.
    module.encoder.embed_tokens.weight = module.shared.weight


# --- checkpoint names --------------------------------------------------------------------------

_BLOCK_KEYS = {  # official name inside blocks.N -> name inside encoder.block.N
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    # Wan: fc2(fc1(x) * gate(x)) with gate = Linear + GELU; HF: wo(act(wi_0(x)) * wi_1(x)).
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}
_TOP_KEYS = {"token_embedding.weight": EMBEDDING_KEY, "norm.weight": "encoder.final_layer_norm.weight"}
_BLOCK_KEYS_INV = {v: k for k, v in _BLOCK_KEYS.items()}
_TOP_KEYS_INV = {v: k for k, v in _TOP_KEYS.items()}
_OFFICIAL_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")
_HF_BLOCK = re.compile(r"encoder\.block\.(\d+)\.(.+)")


def official_t5_key_to_hf(key: str) -> str:
    """``blocks.3.ffn.fc1.weight`` -> ``encoder.block.3.layer.1.DenseReluDense.wi_1.weight``."""
    if key in _TOP_KEYS:
        return _TOP_KEYS[key]
    match = _OFFICIAL_BLOCK.fullmatch(key)
    if match and match.group(2) in _BLOCK_KEYS:
        return f"encoder.block.{match.group(1)}.{_BLOCK_KEYS[match.group(2)]}"
    raise CheckpointError(f"unknown T5 key {key!r} (not a Wan UMT5 encoder tensor)")


def hf_t5_key_to_official(key: str) -> str:
    """The inverse of ``official_t5_key_to_hf`` (writes official-layout files, e.g. tiny models)."""
    if key in _TOP_KEYS_INV:
        return _TOP_KEYS_INV[key]
    match = _HF_BLOCK.fullmatch(key)
    if match and match.group(2) in _BLOCK_KEYS_INV:
        return f"blocks.{match.group(1)}.{_BLOCK_KEYS_INV[match.group(2)]}"
    raise CheckpointError(f"unknown UMT5 encoder key {key!r}")


def load_official_t5_state(path: Path) -> dict[str, torch.Tensor]:
    """The official ``models_t5_umt5-xxl-enc-bf16.pth`` (or a .safetensors of it), in HF names."""
    state = read_weights(Path(path))
    renamed: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        try:
            renamed[official_t5_key_to_hf(key)] = tensor
        except CheckpointError as e:
            raise CheckpointError(f"{path}: {e}") from None
    return renamed


def load_diffusers_t5_state(folder: Path) -> dict[str, torch.Tensor]:
    """The weights of a Diffusers ``text_encoder/`` folder (already HF names), single or sharded."""
    folder = Path(folder)
    require_file(folder / "config.json", "text encoder config")
    for name in ("model.safetensors.index.json", "model.safetensors"):
        if (folder / name).is_file():
            path = folder / name
            break
    else:
        raise CheckpointError(
            f"missing text encoder weights: {folder} holds neither model.safetensors "
            "nor model.safetensors.index.json"
        )
    state = read_safetensors(path)
    # Files saved by transformers store the tied embedding once, under either name; keep one.
    alias = state.pop(EMBEDDING_ALIAS, None)
    if alias is not None and EMBEDDING_KEY not in state:
        state[EMBEDDING_KEY] = alias
    return state


# --- tokenizer ---------------------------------------------------------------------------------

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def load_tokenizer(folder: Path | str) -> PreTrainedTokenizerBase:
    """A tokenizer from a local folder (``google/umt5-xxl/``, Diffusers ``tokenizer/``, tiny)."""
    path = Path(folder)
    if not path.is_dir():
        if _HUB_ID.fullmatch(str(folder)) and not path.exists():
            raise CheckpointError(
                f"tokenizer folder {folder} does not exist; if it is a Hugging Face hub id, loading "
                "from the hub is not supported: download it and pass the local folder"
            )
        raise CheckpointError(f"missing tokenizer folder: {path} does not exist or is not a folder")
    if not any((path / name).is_file() for name in ("tokenizer.json", "spiece.model")):
        raise CheckpointError(f"{path}: not a tokenizer folder (no tokenizer.json or spiece.model)")
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2, as in T5

# Words for prompts of the tiny random-weight model; with the specials under its vocab of 384.
TINY_VOCABULARY: list[str] = """
a an the this that these those one two three four five some many few all every each another
and or but with without of in on at to from into onto over under above below behind near between
around through across along toward towards away up down out off by for as while then
is are was be being it its they them their he she his her we you i there here
red orange yellow green blue purple pink brown black white gray grey gold silver colorful
bright dark light pale
circle square triangle cube sphere ball box ring star line dot shape shapes block wave spiral
big small large tiny tall short long wide round flat thin thick soft hard smooth shiny
old new young little beautiful happy sad calm quiet loud fast slow slowly quickly gently
moving moves move rolling rolls roll bouncing bounces bounce spinning spins spin rotating rotates
falling falls fall flying flies fly running runs run walking walks walk jumping jumps jump
swimming swims swim floating floats float dancing dances dance sliding slides slide
turning turns turn rising rises glowing glows shining shines flowing flows growing grows
sitting sits standing stands looking looks playing plays eating eats sleeping
left right forward backward center middle top bottom side front back
cat dog bird fish horse cow sheep rabbit bear lion tiger elephant monkey fox wolf deer
duck chicken butterfly bee snake frog turtle whale dolphin shark owl eagle mouse panda
man woman boy girl person people child children baby friends family
car bus train boat ship plane bicycle bike truck rocket robot
tree trees flower flowers grass leaf leaves forest garden park field farm
sky cloud clouds sun moon stars rain snow wind fog storm lightning rainbow fire smoke water
sea ocean river lake beach sand waves mountain mountains hill hills desert island
city street road bridge house home building tower window door room kitchen table chair
bed wall floor roof castle village market shop
morning day night evening sunset sunrise summer winter spring autumn
camera view shot close aerial scene background foreground motion video
realistic cinematic cartoon painting style high quality detailed
""".split()
TINY_VOCABULARY += [",", ".", "!", "?", "-", "'", "0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]


_TINY_SPECIALS = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}
_TINY_CONFIG = {
    "tokenizer_class": "PreTrainedTokenizerFast",
    "model_max_length": 512,
    "padding_side": "right",
}


def _word_level_tokenizer(words: list[str]):
    """A word-level ``tokenizers.Tokenizer`` over ``words`` (lower-cased), T5's conventions:
    ``<pad>``=0, ``</s>``=1, ``<unk>``=2, ``</s>`` appended; unknown words -> ``<unk>``."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for word in words:
        vocab.setdefault(word.lower(), len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation("isolated")]
    )
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return tokenizer


def tiny_tokenizer(words: list[str]) -> PreTrainedTokenizerBase:
    """The tokenizer ``write_tiny_tokenizer`` writes, built in memory."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=_word_level_tokenizer(words), **_TINY_CONFIG, **_TINY_SPECIALS
    )


def write_tiny_tokenizer(folder: Path, words: list[str]) -> None:
    """Write the word-level tokenizer over ``words`` (``tiny_tokenizer``) that ``load_tokenizer`` loads."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _word_level_tokenizer(words).save(str(folder / "tokenizer.json"))
    # Written by hand rather than save_pretrained: "PreTrainedTokenizerFast" loads in transformers
    # 4.x and 5.x alike (5.x would write its own "TokenizersBackend").
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **_TINY_CONFIG, **_TINY_SPECIALS}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(_TINY_SPECIALS, indent=2) + "\n")


# --- encoding ----------------------------------------------------------------------------------


def clean_prompt(text: str) -> str:
    """Wan's prompt cleaning ("whitespace" mode): ftfy, double html unescape, one space, strip."""
    if ftfy is not None:
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


class TextEncoder:
    """UMT5 encoder + tokenizer: prompts -> one [tokens, d_model] embedding per prompt.

    Embeddings are cached per cleaned prompt text (on the CPU), so a repeated prompt, and the
    default negative prompt of every job, costs nothing after the first time.
    """

    def __init__(
        self, model: UMT5EncoderModel, tokenizer: PreTrainedTokenizerBase, text_len: int, cache_size: int = 64
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.text_len = text_len
        self.cache_size = cache_size
        self.cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.encoder_runs = 0  # batches actually run through the encoder
        self.streamer: BlockStreamer | None = None
        self._device = next(self.model.parameters()).device

    @property
    def device(self) -> torch.device:
        """Where the encoder computes (its blocks may live elsewhere when streamed)."""
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def stream_to(self, device: torch.device) -> None:
        """Keep the weights where they are (CPU) and run each block on ``device``, streamed."""
        self._device = torch.device(device)
        self.model.encoder.final_layer_norm.to(self._device)
        self.streamer = BlockStreamer(self.model.encoder.block, self._device)

    def encode(self, prompts: list[str]) -> list[torch.Tensor]:
        """One tensor per prompt, trimmed to its real token count (``</s>`` included), as Wan does."""
        texts = [clean_prompt(p) for p in prompts]
        missing = list(dict.fromkeys(t for t in texts if t not in self.cache))
        if missing:
            for text, states in zip(missing, self._run(missing)):
                self.cache[text] = states.cpu()
        out = []
        for text in texts:
            self.cache.move_to_end(text)
            out.append(self.cache[text].to(self._device))
        while len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)
        return out

    def _run(self, texts: list[str]) -> list[torch.Tensor]:
        with torch.no_grad():
            states = self.hidden_states(texts)
        self.encoder_runs += 1
        return states

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask [N, text_len] of ``texts`` as given (no cleaning), on the CPU."""
        batch = self.tokenizer(
            texts,
            padding="max_length",
            truncation=True,
            max_length=self.text_len,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        return batch["input_ids"], batch["attention_mask"]

    def hidden_states(self, texts: list[str]) -> list[torch.Tensor]:
        """Encoder states of ``texts`` as given (no cleaning, no cache), each trimmed to its tokens."""
        ids, mask = self.tokenize(texts)
        mask = mask.to(self._device)
        if self.streamer is None:
            hidden = self.model(input_ids=ids.to(self._device), attention_mask=mask)
        else:  # the embedding table stays on the CPU: look up there, compute on the device
            embeds = self.model.shared(ids).to(self._device)
            hidden = self.model(inputs_embeds=embeds, attention_mask=mask)
        lengths = mask.gt(0).sum(dim=1).tolist()
        return [h[:n] for h, n in zip(hidden.last_hidden_state, lengths)]
