"""The book's figures: one module per page, each function drawing one figure and showing it.

Notebooks call these from folded cells, so a page shows the picture and the prose, not fifty lines of matplotlib.
Figures are drawn at the size they are shown (at most 10.5 x 8 inches at 80 dpi), so their text stays legible.
"""
