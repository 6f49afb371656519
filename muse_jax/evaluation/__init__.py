"""Evaluation: text alignment on shapes (a programmatic detector), FID (Flax InceptionV3 and an
offline in-domain feature set), tokenizer metrics, and sweeps.

  detector.py   `detect(image)` -> background and objects (colour, shape, size, cell)
  alignment.py  `parse_caption`, `scene_requirements`, `score`, `alignment_report`, `eval_prompts`,
                `detector_accuracy`
  features.py   `shapes_features` (in-domain FID features), cached reference statistics
  fid.py        `frechet_distance`, `fid_from_features`, `cached_statistics`, pytorch-fid's
                statistics files (`save_statistics`, `load_statistics`)
  inception.py  the FID InceptionV3 (pool3, 2048-d), `load_torch_state_dict`, `load_inception`,
                the resize protocols ("legacy" pytorch-fid, "clean" clean-fid: `clean_resize`)
  metrics.py    `psnr`, `ssim`, `codebook_usage`
  sweep.py      `write_sweep` (JSON + PNG of quality vs steps / guidance), `write_front` (FID vs CLIP)
  report.py     `evaluate_images`, `evaluate_tokenizer`, `validate_detector`, `timed_generation`
  caption_sets.py  captions and reference images of a txt / jsonl / folder / tfds source
  zero_shot.py  `muse-jax eval --prompts`: FID and CLIP score on a caption set, chunked, resumable,
                sharded over processes
"""
