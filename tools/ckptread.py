"""ckptread.py - read PyTorch zip checkpoints (.pt) and safetensors files with numpy only.

    tensors = read_torch_zip("base-model.pt")   # {name: LazyTensor}, nothing loaded yet
    tensors = read_safetensors("model.safetensors")
    arr = tensors["embedding.weight"].numpy()   # float32 for float types (bf16/f16 decoded)

PyTorch files are read with a restricted unpickler: the only globals it resolves are the tensor
rebuild functions, the storage types, OrderedDict and the Parameter markers; anything else in the
pickle is refused (CheckpointError), nothing in the file is ever called. Storage data is memory
mapped when the zip entry is stored uncompressed (torch.save always does this), so a 12 GB file
costs no memory until a tensor is asked for, and then only that tensor.
"""

import collections
import json
import os
import pickle
import struct
import zipfile

import numpy as np

__all__ = ["CheckpointError", "LazyTensor", "read_torch_zip", "read_safetensors", "bf16_to_f32"]


class CheckpointError(Exception):
    pass


def bf16_to_f32(u16):
    return (np.asarray(u16, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


# dtype tag -> (numpy storage dtype, itemsize)
_NP = {"f32": "<f4", "f16": "<f2", "bf16": "<u2", "f64": "<f8", "i64": "<i8", "i32": "<i4", "i16": "<i2",
       "i8": "i1", "u8": "u1", "u16": "<u2", "u32": "<u4", "u64": "<u8", "bool": "u1"}
FLOAT_TAGS = ("f32", "f16", "bf16", "f64")


class _Storage:
    """One storage (torch) or one tensor's byte range (safetensors)."""

    def __init__(self, ident, dtype, numel, loader):
        self.ident = ident
        self.dtype = dtype
        self.numel = numel
        self._loader = loader
        self._arr = None

    def array(self):
        """The storage as a 1-D array. Memory maps are not kept (their pages would stay resident
        after the tensor has been copied out); in-memory copies of compressed entries are."""
        if self._arr is not None:
            return self._arr
        a = self._loader()
        if a.shape[0] != self.numel:
            raise CheckpointError("storage %s: %d elements stored, %d declared" % (self.ident, a.shape[0], self.numel))
        if not isinstance(a, np.memmap):
            self._arr = a
        return a


class LazyTensor:
    """A tensor in a checkpoint, not loaded until numpy() is called."""

    def __init__(self, storage, offset, shape, stride, name=None):
        self.storage = storage
        self.offset = int(offset)
        self.shape = tuple(int(s) for s in shape)
        self.stride = tuple(int(s) for s in stride)
        self.name = name
        if len(self.stride) != len(self.shape):
            raise CheckpointError("tensor %s: %d sizes but %d strides" % (name, len(self.shape), len(self.stride)))
        if any(s < 0 for s in self.shape) or any(s < 0 for s in self.stride) or self.offset < 0:
            raise CheckpointError("tensor %s: negative size, stride or offset" % name)
        if all(s > 0 for s in self.shape):
            last = self.offset + sum((n - 1) * st for n, st in zip(self.shape, self.stride))
            if last >= storage.numel:
                raise CheckpointError("tensor %s: view (offset %d, shape %s, stride %s) reaches element %d of a "
                                      "%d-element storage" % (name, self.offset, self.shape, self.stride, last,
                                                              storage.numel))

    @property
    def dtype(self):
        return self.storage.dtype

    @property
    def size(self):
        return int(np.prod(self.shape, dtype=np.int64))

    def key(self):
        """Identity of the view: equal keys mean the same values (tied tensors)."""
        return (self.storage.ident, self.offset, self.shape, self.stride)

    def raw(self):
        """The values in the storage dtype (bf16 as uint16), contiguous copy."""
        if self.size == 0:
            return np.zeros(self.shape, dtype=_NP[self.dtype])
        base = self.storage.array()
        item = base.dtype.itemsize
        v = np.lib.stride_tricks.as_strided(base[self.offset:], shape=self.shape,
                                            strides=tuple(s * item for s in self.stride), writeable=False)
        return np.ascontiguousarray(v)

    def numpy(self):
        """float32 for the float dtypes; the raw integers otherwise."""
        a = self.raw()
        if self.dtype == "bf16":
            return bf16_to_f32(a)
        if self.dtype in ("f16", "f64"):
            return a.astype(np.float32)
        if self.dtype == "f32":
            return a.astype(np.float32, copy=False)
        return a

    def __repr__(self):
        return "LazyTensor(%s, %s, %s)" % (self.name, self.dtype, self.shape)


# ------------------------------------------------------------------------------------------------
# PyTorch zip checkpoints

_TORCH_STORAGE = {"FloatStorage": "f32", "HalfStorage": "f16", "BFloat16Storage": "bf16", "DoubleStorage": "f64",
                  "LongStorage": "i64", "IntStorage": "i32", "ShortStorage": "i16", "CharStorage": "i8",
                  "ByteStorage": "u8", "BoolStorage": "bool", "UntypedStorage": "u8"}


class _StorageType:
    def __init__(self, tag):
        self.tag = tag


class _Marker:
    """Stands for an allowed torch class (Parameter, Tensor) that is never instantiated."""

    def __init__(self, name):
        self.name = name


def _rebuild_from_type_v2(func, new_type, args, state):
    return func(*args)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *rest):
    return data


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, fh, storage_for):
        super().__init__(fh)
        self._storage_for = storage_for

    def find_class(self, module, name):
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return self._rebuild_tensor
        if module == "torch._utils" and name in ("_rebuild_parameter", "_rebuild_parameter_with_state"):
            return _rebuild_parameter
        if module == "torch._tensor" and name == "_rebuild_from_type_v2":
            return _rebuild_from_type_v2
        if module == "torch" and name in _TORCH_STORAGE:
            return _StorageType(_TORCH_STORAGE[name])
        if (module, name) in (("torch.nn.parameter", "Parameter"), ("torch", "Tensor")):
            return _Marker(name)
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        raise CheckpointError("the pickle asks for %s.%s, which a tensor checkpoint does not need: refused"
                              % (module, name))

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise CheckpointError("unsupported persistent id %r" % (pid,))
        _, stype, key, _location, numel = pid
        if not isinstance(stype, _StorageType) or not isinstance(key, str) or not isinstance(numel, int):
            raise CheckpointError("malformed storage reference %r" % (pid,))
        return self._storage_for(key, stype.tag, numel)

    @staticmethod
    def _rebuild_tensor(storage, storage_offset, size, stride, *rest):
        if not isinstance(storage, _Storage):
            raise CheckpointError("tensor rebuilt from something that is not a storage")
        if not (isinstance(size, tuple) and isinstance(stride, tuple) and isinstance(storage_offset, int)):
            raise CheckpointError("malformed tensor record")
        return LazyTensor(storage, storage_offset, size, stride)


def _zip_data_offset(path, info):
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        h = f.read(30)
    if len(h) != 30 or h[:4] != b"PK\x03\x04":
        raise CheckpointError("%s: bad zip local header for %s" % (path, info.filename))
    n, m = struct.unpack("<HH", h[26:30])
    return info.header_offset + 30 + n + m


def read_torch_zip(path):
    """{name: LazyTensor or other pickled value} of a torch.save()d state dict (zip format)."""
    path = str(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"PK\x03\x04":
        if magic[:2] == b"\x80\x02" or magic[:1] == b"\x80":
            raise CheckpointError("%s: a legacy (pre-1.6, non-zip) PyTorch file; re-save it with "
                                  "torch.save(..., _use_new_zipfile_serialization=True)" % path)
        raise CheckpointError("%s: not a PyTorch zip checkpoint (magic %r)" % (path, magic))
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise CheckpointError("%s: bad zip file: %s" % (path, e))
    with zf:
        names = zf.namelist()
        pk = [n for n in names if n == "data.pkl" or n.endswith("/data.pkl")]
        if len(pk) != 1:
            raise CheckpointError("%s: expected one data.pkl in the zip, found %d" % (path, len(pk)))
        prefix = pk[0][:-len("data.pkl")]
        infos = {i.filename: i for i in zf.infolist()}
        bo = prefix + "byteorder"
        if bo in infos:
            order = zf.read(bo).decode("ascii", "replace").strip()
            if order != "little":
                raise CheckpointError("%s: byteorder %r, only little-endian checkpoints are supported" % (path, order))
        storages = {}

        def storage_for(key, tag, numel):
            if key in storages:
                s = storages[key]
                if s.dtype != tag:
                    raise CheckpointError("%s: storage %s used as both %s and %s" % (path, key, s.dtype, tag))
                return s
            entry = prefix + "data/" + key
            if entry not in infos:
                raise CheckpointError("%s: storage %s (%s) missing from the zip" % (path, key, entry))
            info = infos[entry]
            dt = np.dtype(_NP[tag])
            if info.file_size != numel * dt.itemsize:
                raise CheckpointError("%s: storage %s holds %d bytes, expected %d x %d" % (
                    path, key, info.file_size, numel, dt.itemsize))

            def load():
                if numel == 0:
                    return np.zeros(0, dt)
                if info.compress_type == zipfile.ZIP_STORED:
                    off = _zip_data_offset(path, info)
                    return np.memmap(path, dtype=dt, mode="r", offset=off, shape=(numel,))
                return np.frombuffer(zf_read(entry), dtype=dt)

            s = _Storage(entry, tag, numel, load)
            storages[key] = s
            return s

        def zf_read(entry):
            with zipfile.ZipFile(path) as z2:
                return z2.read(entry)

        try:
            with zf.open(pk[0]) as fh:
                obj = _RestrictedUnpickler(fh, storage_for).load()
        except CheckpointError:
            raise
        except Exception as e:  # malformed pickle data of any kind
            raise CheckpointError("%s: cannot unpickle %s: %s: %s" % (path, pk[0], type(e).__name__, e))
    sd = _find_state_dict(obj, path)
    for k, v in sd.items():
        if isinstance(v, LazyTensor) and v.name is None:
            v.name = k
    return sd


def _find_state_dict(obj, path):
    if not isinstance(obj, dict):
        raise CheckpointError("%s: the pickle holds a %s, expected a state dict" % (path, type(obj).__name__))
    if any(isinstance(v, LazyTensor) for v in obj.values()):
        return obj
    for k in ("state_dict", "model", "module", "model_state_dict"):
        if isinstance(obj.get(k), dict) and any(isinstance(v, LazyTensor) for v in obj[k].values()):
            return obj[k]
    raise CheckpointError("%s: no tensors found at the top level of the pickle" % path)


# ------------------------------------------------------------------------------------------------
# safetensors

_ST_DTYPES = {"F32": "f32", "F16": "f16", "BF16": "bf16", "F64": "f64", "I64": "i64", "I32": "i32", "I16": "i16",
              "I8": "i8", "U8": "u8", "U16": "u16", "U32": "u32", "U64": "u64", "BOOL": "bool"}


def read_safetensors(path):
    """({name: LazyTensor}, metadata dict) of a .safetensors file."""
    path = str(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        h = f.read(8)
        if len(h) < 8:
            raise CheckpointError("%s: too short for a safetensors file" % path)
        (n,) = struct.unpack("<Q", h)
        if n > min(size - 8, 256 << 20):
            raise CheckpointError("%s: header length %d does not fit the file (%d bytes)" % (path, n, size))
        raw = f.read(n)
    try:
        hdr = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError("%s: header is not JSON: %s" % (path, e))
    if not isinstance(hdr, dict):
        raise CheckpointError("%s: header is not a JSON object" % path)
    meta = hdr.pop("__metadata__", None) or {}
    base = 8 + n
    out = {}
    for name, d in hdr.items():
        try:
            tag = _ST_DTYPES[d["dtype"]]
            shape = [int(x) for x in d["shape"]]
            b, e = (int(x) for x in d["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError("%s: tensor %s: bad or unsupported header entry %r" % (path, name, d))
        dt = np.dtype(_NP[tag])
        numel = int(np.prod(shape, dtype=np.int64))
        if any(x < 0 for x in shape) or b < 0 or e < b or base + e > size or e - b != numel * dt.itemsize:
            raise CheckpointError("%s: tensor %s: data_offsets [%d, %d) do not hold %s %s in a %d-byte file"
                                  % (path, name, b, e, d["dtype"], shape, size))

        def load(off=base + b, numel=numel, dt=dt):
            if numel == 0:
                return np.zeros(0, dt)
            return np.memmap(path, dtype=dt, mode="r", offset=off, shape=(numel,))

        st = _Storage("%s:%s" % (path, name), tag, numel, load)
        stride = [1] * len(shape)
        for i in range(len(shape) - 2, -1, -1):
            stride[i] = stride[i + 1] * shape[i + 1]
        out[name] = LazyTensor(st, 0, shape, stride, name)
    return out, meta
