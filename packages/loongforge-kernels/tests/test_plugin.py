"""Plugin registration: cheap to import, every kernel resolvable, impl and reference agree on API."""

import inspect
import subprocess
import sys
import textwrap

from loongforge.registry import Kernel, load_object


def test_plugin_import_pulls_in_neither_torch_nor_triton():
    code = textwrap.dedent(
        """
        import sys
        import loongforge, loongforge.registry
        torch_before = "torch" in sys.modules
        import loongforge_kernels, loongforge_kernels.plugin
        kernels = loongforge_kernels.plugin.loongforge_register_kernels()
        assert kernels, "no kernels registered"
        assert "triton" not in sys.modules, "triton imported"
        assert torch_before or "torch" not in sys.modules, "torch imported"
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_registered_kernels_resolve_with_matching_signatures():
    from loongforge_kernels import plugin

    assert plugin.LOONGFORGE_API_VERSION == "1.0"
    kernels = plugin.loongforge_register_kernels()
    assert all(isinstance(k, Kernel) for k in kernels)
    names = [k.name for k in kernels]
    assert len(set(names)) == len(names)
    assert {k.op for k in kernels} == {
        "rmsnorm",
        "add_rmsnorm",
        "swiglu",
        "rope",
        "qkv_rope",
        "flash_attention",
        "fused_linear_cross_entropy",
        "adamw_step",
        "lightning_indexer",
        "sparse_mla_forward",
    }
    for k in kernels:
        impl, ref = load_object(k.impl), load_object(k.reference)
        assert inspect.signature(impl) == inspect.signature(ref), k.name
        assert k.device_types == ("cuda",)
        assert k.description
