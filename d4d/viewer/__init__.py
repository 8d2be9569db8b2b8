"""The viser 4D viewer behind ``python -m d4d.view`` (:class:`d4d.viewer.app.FourDViewer`)."""
