"""The provenance of a raw output (git commit, dirty flag, version): `titans.provenance.provenance`.

It lives in `titans/provenance.py`, the lowest layer, because the methods that write raw outputs
(`titans.active`, `titans.cascade`, `titans.ensemble`) sit below `titans.results` and may not import it
(`lint-imports`); this name re-exports it for the result tools.
"""

from titans.provenance import provenance

__all__ = ["provenance"]
