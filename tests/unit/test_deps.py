"""A missing optional dependency gives an error that says what to install."""
import subprocess
import sys
import textwrap

from conftest import ROOT


def test_missing_trimesh_is_explained(tmp_path):
    """Every mesh file is written without trimesh (jointcore.mesh_io); the trimesh conversion helper needs it and
    says so."""
    code = textwrap.dedent(f"""
        import importlib.abc, sys
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split('.')[0] == 'trimesh':
                    raise ImportError("No module named 'trimesh'")
        sys.meta_path.insert(0, Block())
        sys.path.insert(0, {str(ROOT)!r})
        import torch
        from jointcore import mesh   # importing needs no trimesh
        g = torch.Generator().manual_seed(0)   # depths within the 10 % cut: every triangle is kept
        m = mesh.rgbd_to_mesh(torch.rand(3, 8, 8, generator=g), torch.rand(8, 8, generator=g) * 0.05 + 1,
                              depth_kind='depth')[0]
        for fmt in ('glb', 'ply', 'obj'):
            print('FILE', mesh.export_mesh(m, {str(tmp_path)!r} + '/m.' + fmt, fmt)[0])
        try:
            mesh.to_trimesh(m)
        except ImportError as e:
            print('MSG', e)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "m.glb").read_bytes()[:4] == b"glTF"
    assert (tmp_path / "m.ply").read_bytes()[:4] == b"ply\n"
    assert (tmp_path / "m.obj").read_bytes().startswith(b"# jointdiffusion")
    msg = r.stdout.split("MSG", 1)[1]
    assert "pip install trimesh" in msg
