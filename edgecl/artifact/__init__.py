"""The edgecl artifact: one safe, compact, versioned file holding a `PackedModel` (spec: docs/ARTIFACT.md).

The container is safetensors (8-byte header length, JSON header, raw tensor bytes), so any safetensors tool can list
it and nothing on the load path can execute code. The header's ``__metadata__`` carries the JSON manifest (format
version, arch, method and config, tasks, delta specs, and per blob its decoded dtype/shape, encoding and checksum) plus
one digest over the manifest and the tensor table. Blobs are stored raw or encoded (bit-packing, XOR against the
previous task's mask, support-only values, byte shuffle, zstd): the writer keeps whichever candidate is smallest.

Reading is lazy: `load` validates header and manifest only; `Artifact.materialize(t)` reads, verifies and decodes
just the base blobs and task t's blobs, then runs `deltas.materialize_param` — the delta arithmetic lives there only.
Every damage the reader can meet becomes `ArtifactError(path, field, problem)`; decoded sizes are bounded by the
manifest's shapes, and those by the file size, before anything is allocated. Depends on numpy and zstandard only.

One job per module, data flowing down the list (none imports one below it):

- `limits` — every bound the reader and writer enforce, and why;
- `encodings` — pure array ↔ bytes encoding steps (no files, no manifest);
- `container` — the safetensors layout, tensor table, digest and blob checksums;
- `node_masks` — format 3's packed node masks: one blob per task, laid out by the manifest's `node_groups`;
- `manifest` — manifest validation: fields, names, blob entries, structure against the arch;
- `reader` — the lazy `Artifact` (`load`);
- `writer` — `save` and `append_task`, crash-safe;
- `report` — `inspect`.
"""
from edgecl.artifact.container import META_DIGEST, META_MANIFEST, checksum, digest
from edgecl.artifact.encodings import STEPS
from edgecl.artifact.limits import (DECODE_FLOOR, DECODE_RATIO, MAX_CLASSES, MAX_DECODED_BYTES, MAX_HEADER_BYTES,
                                    MAX_NDIM, MAX_TASKS)
from edgecl.artifact.manifest import BLOB_FIELDS, FORMAT_NAME, FORMAT_VERSION
from edgecl.artifact.reader import Artifact, load
from edgecl.artifact.report import COMPONENTS, MASK_COMPONENTS, component_of, inspect
from edgecl.artifact.writer import append_task, save
from edgecl.errors import ArtifactError, UsageError

__all__ = ["Artifact", "ArtifactError", "BLOB_FIELDS", "COMPONENTS", "DECODE_FLOOR", "DECODE_RATIO", "FORMAT_NAME",
           "FORMAT_VERSION", "MASK_COMPONENTS", "MAX_CLASSES", "MAX_DECODED_BYTES", "MAX_HEADER_BYTES", "MAX_NDIM",
           "MAX_TASKS", "META_DIGEST", "META_MANIFEST", "STEPS", "UsageError", "append_task", "checksum",
           "component_of", "digest", "inspect", "load", "save"]
