"""What the video modules share: the request/result contract, camera paths, output writing."""
