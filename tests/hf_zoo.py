"""Hugging Face transformers architectures that hold BatchNorm, built from small configurations (no download),
for the fusion-coverage script (tools/fusion_coverage.py) and tests/test_hf_models.py.

Each entry: name -> (configuration class, model class, configuration keywords, input shape). What
``convert_model`` can not fuse in them, and why, is in ``UNFUSED`` (checked by the tests: a BN missing from
it must be fused, and one listed must still be missed, so the list stays true).
"""
import torch

MODELS = {
    "mobilenet_v1": ("MobileNetV1Config", "MobileNetV1Model", dict(depth_multiplier=0.25), (2, 3, 33, 35)),
    "mobilenet_v2_deeplab": ("MobileNetV2Config", "MobileNetV2ForSemanticSegmentation", dict(depth_multiplier=0.25),
                             (2, 3, 33, 35)),
    "efficientnet": ("EfficientNetConfig", "EfficientNetModel",
                     dict(width_coefficient=1.0, depth_coefficient=0.2, image_size=64, hidden_dim=1280),
                     (2, 3, 32, 32)),
    "resnet": ("ResNetConfig", "ResNetModel", dict(embedding_size=8, hidden_sizes=[8, 16, 24, 32], depths=[1, 2, 1, 1]),
               (2, 3, 32, 32)),
    "resnet_basic": ("ResNetConfig", "ResNetModel", dict(embedding_size=8, hidden_sizes=[8, 16, 24, 32],
                                                        depths=[1, 1, 1, 1], layer_type="basic"), (2, 3, 32, 32)),
    "regnet": ("RegNetConfig", "RegNetModel", dict(embedding_size=8, hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1],
                                                   groups_width=8), (2, 3, 32, 32)),
    "rt_detr_resnet": ("RTDetrResNetConfig", "RTDetrResNetBackbone",
                       dict(embedding_size=8, hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1],
                            out_features=["stage2", "stage3", "stage4"]), (2, 3, 32, 32)),
    "mobilevit": ("MobileViTConfig", "MobileViTModel",
                  dict(hidden_sizes=[16, 24, 32], image_size=64, neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 64]),
                  (2, 3, 64, 64)),
    "mobilevit_v2": ("MobileViTV2Config", "MobileViTV2Model", dict(width_multiplier=0.25, image_size=64), (2, 3, 64, 64)),
    "swiftformer": ("SwiftFormerConfig", "SwiftFormerModel", dict(depths=[1, 1, 1, 1], embed_dims=[8, 16, 24, 32]),
                    (2, 3, 32, 32)),
    "levit": ("LevitConfig", "LevitModel", dict(image_size=64, hidden_sizes=[16, 24, 32], num_attention_heads=[1, 1, 1],
                                                depths=[1, 1, 1], key_dim=[8, 8, 8]), (2, 3, 64, 64)),
    "hgnet_v2": ("HGNetV2Config", "HGNetV2Backbone", dict(), (2, 3, 32, 32)),
    "textnet": ("TextNetConfig", "TextNetModel", dict(), (2, 3, 32, 32)),
    "pp_lcnet": ("PPLCNetConfig", "PPLCNetBackbone", dict(), (2, 3, 32, 32)),
    "segformer": ("SegformerConfig", "SegformerForSemanticSegmentation",
                  dict(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1], num_attention_heads=[1, 1, 1, 1],
                       decoder_hidden_size=16), (2, 3, 32, 32)),
    "glpn": ("GLPNConfig", "GLPNForDepthEstimation", dict(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1],
                                                          num_attention_heads=[1, 1, 1, 1], decoder_hidden_size=16),
             (2, 3, 32, 32)),
    "wav2vec2_conformer": ("Wav2Vec2ConformerConfig", "Wav2Vec2ConformerModel",
                           dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                                conv_dim=(8, 8), conv_stride=(5, 2), conv_kernel=(10, 3), num_feat_extract_layers=2,
                                conv_depthwise_kernel_size=3, num_conv_pos_embeddings=4,
                                num_conv_pos_embedding_groups=2, apply_spec_augment=False), (2, 400)),
    "parakeet": ("ParakeetEncoderConfig", "ParakeetEncoder",
                 dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                      conv_kernel_size=3, subsampling_conv_channels=8, num_mel_bins=16), (2, 64, 16)),
    "vitpose": ("VitPoseConfig", "VitPoseForPoseEstimation",
                dict(backbone_config=dict(model_type="vitpose_backbone", hidden_size=16, num_hidden_layers=1,
                                          num_attention_heads=2, intermediate_size=16, image_size=[32, 24],
                                          patch_size=[8, 8], out_indices=[1]), use_simple_decoder=False),
                (2, 3, 32, 24)),
    "upernet": ("UperNetConfig", "UperNetForSemanticSegmentation",
                dict(backbone_config=dict(model_type="convnext", hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1],
                                          out_features=["stage1", "stage2", "stage3", "stage4"]),
                     hidden_size=16, auxiliary_channels=8, num_labels=3), (2, 3, 32, 32)),
    "dpt": ("DPTConfig", "DPTForDepthEstimation",
            dict(hidden_size=16, num_hidden_layers=4, num_attention_heads=2, intermediate_size=16, image_size=32,
                 patch_size=8, neck_hidden_sizes=[8, 8, 16, 16], fusion_hidden_size=16,
                 backbone_out_indices=[0, 1, 2, 3], use_batch_norm_in_fusion_residual=True), (2, 3, 32, 32)),
    "beit": ("BeitConfig", "BeitForSemanticSegmentation",
             dict(hidden_size=16, num_hidden_layers=4, num_attention_heads=2, intermediate_size=16, image_size=32,
                  patch_size=8, out_indices=[0, 1, 2, 3], pool_scales=[1, 2], auxiliary_channels=8, num_labels=3),
             (2, 3, 32, 32)),
}

# BNs that feed an activation (or an add and then one) in the original and that convert_model leaves unfused,
# per model, by the end of their path, and why no safe method here fuses them.
UNFUSED = {}


def build(name: str, dtype=torch.float64):
    """(model, input) for ``name``, seeded, in ``dtype``."""
    import transformers
    configuration, model_class, keywords, shape = MODELS[name]
    torch.manual_seed(0)
    model = getattr(transformers, model_class)(getattr(transformers, configuration)(**keywords)).to(dtype)
    return model, torch.randn(*shape, dtype=dtype)


def first_tensor(output) -> torch.Tensor:
    """The first tensor of a model's output (a ModelOutput, a tuple, or a tensor)."""
    if isinstance(output, torch.Tensor):
        return output
    values = output.values() if hasattr(output, "values") else output
    for value in values:
        found = first_tensor(value) if not isinstance(value, torch.Tensor) else value
        if found is not None:
            return found
    return None
