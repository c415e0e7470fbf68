"""Images in (decoding, preprocessing) and heatmaps out (rendering, files written all or none)."""
