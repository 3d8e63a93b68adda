"""IA3 and LoHa adapters over real HTTP: uploaded, served beside LoRA with PEFT's tokens, fused, deleted."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from oracle import make_peft_adapter
from peft import IA3Config, LoHaConfig

from .conftest import upload
from .test_api import PROMPT, gen

NEW_TOKENS = 12


def test_ia3_and_loha_serve_beside_lora(server, base_model, oracle, adapters, tmp_path) -> None:
    c = server.client
    dirs = {
        # Seeds and targets chosen so that each adapter changes the greedy tokens (checked below).
        "ia3": make_peft_adapter(base_model, tmp_path / "ia3", seed=24, config_class=IA3Config,
                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                 "down_proj"], feedforward_modules=["down_proj", "up_proj"]),
        "loha": make_peft_adapter(base_model, tmp_path / "loha", seed=21, config_class=LoHaConfig, r=4, alpha=16,
                                  target_modules="all-linear"),
        "alpha": adapters["alpha"],
    }
    infos = {}
    for name, path in dirs.items():
        r = upload(c, path, name)
        assert r.status_code == 201, r.text
        infos[name] = r.json()
    assert infos["ia3"]["type"] == "IA3" and infos["loha"]["type"] == "LOHA" and infos["loha"]["rank"] == 4

    for name in ("ia3", "loha"):
        oracle.add(name, dirs[name])
    expected = {name: oracle.tokens(name, PROMPT, NEW_TOKENS) for name in ("ia3", "loha")}
    expected["alpha"] = oracle.tokens("alpha", PROMPT, NEW_TOKENS)
    base_tokens = oracle.tokens(None, PROMPT, NEW_TOKENS)
    assert all(tokens != base_tokens for tokens in expected.values()), "each adapter must change the output"
    names = ["ia3", "loha", "alpha"] * 2
    with ThreadPoolExecutor(len(names)) as pool:
        outs = list(pool.map(lambda a: gen(c, PROMPT, a, NEW_TOKENS).json()["token_ids"], names))
    assert outs == [expected[n] for n in names]

    assert c.put("/adapters/ia3/activate", params={"fuse": "true"}).json() == {"active": "ia3", "fused": True}
    assert gen(c, PROMPT, None, NEW_TOKENS).json()["token_ids"] == expected["ia3"]
    assert c.delete("/adapters/ia3").status_code == 200
    assert gen(c, PROMPT, "ia3", NEW_TOKENS).status_code == 404
    health = c.get("/health").json()
    assert health["adapter_bytes"] == infos["loha"]["resident_bytes"] + infos["alpha"]["resident_bytes"]
    assert gen(c, PROMPT, "loha", NEW_TOKENS).json()["token_ids"] == expected["loha"]
