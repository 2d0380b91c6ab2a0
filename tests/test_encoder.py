"""Encoder models served like any model: the vectors equal sentence-transformers' own on the same folder.

The oracle is ``SentenceTransformer(folder).encode(texts, normalize_embeddings=True)``
on the model folder the federation serves (all-MiniLM-L6-v2, installed with
tpm-fed); the served vectors come through the runtime (broker, ledger, the
local site's worker) and through ``/v1/embeddings`` with the official client.
"""

from __future__ import annotations

import base64

import numpy as np
import openai
import pytest

from tpm_fed.models.encoder import DEFAULT_ENCODER_NAME, default_encoder_dir
from tpm_fed.protocol.encoding import EncodeRequest
from tpm_fed.protocol.errors import ContextLengthExceeded, InvalidRequest
from tpm_fed.protocol.versions import hash_model_dir

TEXTS = [
    "A cell divides when its copy of the genome is complete.",
    "Rivers carry silt to the sea, and deltas grow where it settles.",
    "x",
    "Über café naïve résumé: 東京 and Zürich, with émigrés.",
    "The telescope's mirror was ground to within twenty nanometres of its figure over two metres. " * 3,
]


@pytest.fixture(scope="module")
def sentence_transformer():
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(default_encoder_dir()), device="cpu")


@pytest.fixture(scope="module")
def openai_client(service):
    return openai.OpenAI(base_url=f"{service.url}/v1", api_key=service.token, max_retries=0)


def _spent(runtime) -> int:
    return sum(balance.spent_usu + balance.reserved_usu for balance in runtime.ledger.balances())


def test_served_vectors_equal_sentence_transformers_encode(runtime, sentence_transformer):
    result = runtime.submit(EncodeRequest.create(DEFAULT_ENCODER_NAME, texts=TEXTS)).result(timeout=300)
    expected = sentence_transformer.encode(TEXTS, normalize_embeddings=True)
    assert result.vectors.shape == (len(TEXTS), 384) == expected.shape
    assert np.abs(result.vectors - expected).max() <= 1e-5
    assert np.allclose(np.linalg.norm(result.vectors, axis=1), 1.0, atol=1e-6)
    assert result.normalized and result.dimensions == 384 and result.pooling.startswith("mean")
    assert result.version == hash_model_dir(default_encoder_dir()) and result.backend == "encoder"
    # Charged per token: each text's tokens as the model's own tokenizer counts them, special tokens included.
    counts = [len(ids) for ids in sentence_transformer.tokenizer(TEXTS)["input_ids"]]
    assert result.token_counts == counts and result.usage.prompt_tokens == sum(counts)
    assert result.charge is not None and result.charge.charged_su > 0


def test_v1_embeddings_with_an_encoder_returns_its_vectors_as_float_and_base64(openai_client, sentence_transformer):
    expected = sentence_transformer.encode(TEXTS[:3], normalize_embeddings=True)
    floats = openai_client.embeddings.create(model=DEFAULT_ENCODER_NAME, input=TEXTS[:3], encoding_format="float")
    got = np.array([row.embedding for row in sorted(floats.data, key=lambda r: r.index)], dtype=np.float32)
    assert np.abs(got - expected).max() <= 1e-5
    assert floats.usage.prompt_tokens == sum(len(ids) for ids in sentence_transformer.tokenizer(TEXTS[:3])["input_ids"])
    assert "normalized" in floats.model_extra["tpm"]["pooling"]
    # The openai client asks for base64 by default and decodes it into floats itself.
    decoded = openai_client.embeddings.create(model=DEFAULT_ENCODER_NAME, input=TEXTS[0])
    assert np.abs(np.array(decoded.data[0].embedding, dtype=np.float32) - expected[0]).max() <= 1e-5
    raw = openai_client.embeddings.with_raw_response.create(model=DEFAULT_ENCODER_NAME, input=TEXTS[0],
                                                            encoding_format="base64").http_response.json()
    row = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    assert row.shape == (384,) and np.abs(row - expected[0]).max() <= 1e-5


def test_a_text_over_the_context_is_refused_naming_the_limit_and_charges_nothing(runtime, openai_client,
                                                                               sentence_transformer):
    long_text = "word " * 300  # 302 tokens; the encoder takes 256
    assert len(sentence_transformer.tokenizer(long_text)["input_ids"]) > 256
    runtime.submit(EncodeRequest.create(DEFAULT_ENCODER_NAME, texts=["warm"])).result(timeout=300)
    before = _spent(runtime)
    future = runtime.submit(EncodeRequest.create(DEFAULT_ENCODER_NAME, texts=["fine", long_text]))
    with pytest.raises(ContextLengthExceeded, match=r"text 1 has 302 tokens.*at most 256 tokens"):
        future.result(timeout=300)
    with pytest.raises(openai.BadRequestError, match="256"):
        openai_client.embeddings.create(model=DEFAULT_ENCODER_NAME, input=[long_text])
    assert _spent(runtime) == before


def test_encode_on_a_language_model_is_refused_before_anything_runs(runtime):
    from tpm_fed.home import DEMO_MODEL_NAME

    with pytest.raises(InvalidRequest, match="not an encoder"):
        runtime.submit(EncodeRequest.create(DEMO_MODEL_NAME, texts=["The cell"]))


def test_bad_encode_requests_are_refused_at_the_edge():
    with pytest.raises(InvalidRequest, match="texts"):
        EncodeRequest.create(DEFAULT_ENCODER_NAME, texts=[])
    with pytest.raises(InvalidRequest, match="empty"):
        EncodeRequest.create(DEFAULT_ENCODER_NAME, texts=["fine", "   "])


def test_the_embedded_default_serves_the_encoder(tmp_path):
    from tpm_fed.federation import Federation
    from tpm_fed.home import DEMO_MODEL_NAME, TpmHome

    home = TpmHome(tmp_path / "home")
    (home.models_dir / DEMO_MODEL_NAME).mkdir(parents=True)  # present: the demo model is not trained here
    home.ensure_embedded_default(progress=False)
    encoder = Federation.load(home.federation_file).model(DEFAULT_ENCODER_NAME)
    assert encoder.kinds == ["encode"]
    assert (encoder.path / "modules.json").is_file() and (encoder.path / "model.safetensors").is_file()
