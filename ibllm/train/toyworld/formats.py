"""The files a scene is written to: one extension per modality, and the sizes and rates inside them.

Exported so loaders / tests can check shapes. Files written by :func:`~ibllm.train.toyworld.dataset.write_scene`
(the formats the media loaders accept):

- ``image.png``: RGB 224x224.
- ``video.mp4``: H.264, yuv420p, 224x224, 12 fps, 24 frames (2 s). Position is the objects' place at the
  middle of the clip; they travel ``MOTION_PX`` pixels from start to end; spinning turns 135 degrees.
- ``point.ply``: binary little-endian ply, ``x y z`` float32, 8192 points, centred, max radius 1, y up.
- ``audio.wav``: 16 kHz mono PCM-16, 3 s.
- ``depth.png``: 16-bit grayscale, distance from the camera in millimetres (objects ~1700-2300, background wall
  4000). Larger value = farther.
- ``thermal.png``: 8-bit grayscale, brighter = hotter (objects ~150-240, background ~25-60).
- ``imu.npy``: float32 (6, 2000), 200 Hz for 10 s: accelerometer x y z in m/s^2 then gyroscope x y z in rad/s.
  Sensor axes: x = right, y = forward (away from the viewer), z = up; gravity reads +9.81 on z at rest. Left /
  right / up / down are three strokes (speed up then slow down) along -x / +x / +z / -z; spinning is a steady
  counter-clockwise turn about z (gyro z ~ +4 rad/s); still is gravity and noise.
- ``text.txt``: the full caption.
"""

EXTENSIONS = {
    "image": ".png", "video": ".mp4", "point": ".ply", "audio": ".wav", "depth": ".png", "thermal": ".png",
    "imu": ".npy", "text": ".txt",
}


# Rendering constants (exported so loaders / tests can check shapes).
IMAGE_SIZE = 224
VIDEO_FPS = 12
VIDEO_FRAMES = 24  # 2 s: the video loader's 2 s clips then span the whole motion (first and last frame)
MOTION_PX = 50.0  # nominal travel from the first to the last video frame
SPIN_DEG = 135.0  # first-to-last turn: not a multiple of the cube's / stripes' 90 degree symmetry
AUDIO_RATE = 16000
AUDIO_SECONDS = 3.0
POINTS = 8192
IMU_RATE = 200
IMU_SAMPLES = 2000
DEPTH_BACKGROUND_MM = 4000
GRAVITY = 9.81
