"""Synthetic stand-ins for the real downloads, written in their exact on-disk layouts.

`write_chexpert`, `write_ham10000` and `write_nih` write files that the real builders read as if
they were the manual downloads, `write_teledermatology` a generic case CSV (`derm/generic_*`), with images that carry learnable signal. The same seed writes
byte-identical files. Command line: `python -m data_builders.synthetic --layout=chexpert --out=DIR`.
"""

from data_builders.synthetic.chexpert_layout import write_chexpert
from data_builders.synthetic.ham10000_layout import write_ham10000
from data_builders.synthetic.nih_layout import write_nih
from data_builders.synthetic.teledermatology_layout import write_teledermatology

__all__ = ["write_chexpert", "write_ham10000", "write_nih", "write_teledermatology"]
