"""Image transfers: uploads of ISO images into image disks, as oVirt's clients make them."""
