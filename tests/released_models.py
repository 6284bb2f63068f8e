"""Facts about the authors' four released TensorFlow checkpoints, read once from their index files
(``models/{256p,512p,1024p,GTA}/model.ckpt.index``): the generator's 3x3 conv kernels as
(height, conv, (kh, kw, in, out)) and the 1x1 head. Each conv also has LayerNorm/gamma and
LayerNorm/beta of shape (out,), the head has biases (3k,), and every variable has two Adam slots;
beta1_power and beta2_power complete each index. Lets a clone without the files check the presets.
"""
_SMALL = [(4, 20, 1024), (8, 1044, 1024), (16, 1044, 1024), (32, 1044, 1024), (64, 1044, 1024),
          (128, 1044, 512), (256, 532, 512)]  # (height, conv1 in, width)
MODULES = {"256p": _SMALL, "GTA": _SMALL, "512p": _SMALL + [(512, 532, 128)],
           "1024p": _SMALL + [(512, 532, 128), (1024, 148, 32)]}
HEAD = {"256p": (1, 1, 512, 27), "GTA": (1, 1, 512, 27), "512p": (1, 1, 128, 3), "1024p": (1, 1, 32, 3)}
INDEX_ENTRIES = {"256p": 134, "GTA": 134, "512p": 152, "1024p": 86}  # 1024p was saved without Adam slots for
ADAM_SLOTS = {"256p": 88, "GTA": 88, "512p": 100, "1024p": 28}        # its frozen lower modules


def variables(name: str) -> dict[str, tuple]:
    """Generator variable name -> shape, as in the released index."""
    out = {}
    for h, cin, w in MODULES[name]:
        for j, shape in ((1, (3, 3, cin, w)), (2, (3, 3, w, w))):
            out[f"g_{h}_conv{j}/weights"] = shape
            out[f"g_{h}_conv{j}/LayerNorm/gamma"] = (w,)
            out[f"g_{h}_conv{j}/LayerNorm/beta"] = (w,)
    top = MODULES[name][-1][0]
    out[f"g_{top}_conv100/weights"] = HEAD[name]
    out[f"g_{top}_conv100/biases"] = (HEAD[name][3],)
    return out
