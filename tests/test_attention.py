"""SEBlock and insert_se_blocks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bilinearpool import SEBlock, insert_se_blocks


class TestSEBlock:
    def test_matches_definition(self):
        se = SEBlock(16, reduction=4)
        x = torch.randn(2, 16, 5, 5)
        weights = torch.sigmoid(se.fc2(torch.relu(se.fc1(x.mean(dim=(2, 3))))))
        torch.testing.assert_close(se(x), x * weights[:, :, None, None])
        assert se.hidden == 4

    def test_tokens(self):
        se = SEBlock(8, reduction=2)
        x = torch.randn(3, 10, 8)
        maps = x.transpose(1, 2).reshape(3, 8, 2, 5)
        torch.testing.assert_close(se(x), se(maps).flatten(2).transpose(1, 2))

    def test_parameters(self):
        se = SEBlock(64, reduction=8)
        assert sum(p.numel() for p in se.parameters()) == 64 * 8 + 8 + 8 * 64 + 64

    def test_factories(self):
        se = SEBlock(8, reduction=2, act_layer=nn.GELU, gate_layer=nn.Hardsigmoid, dtype=torch.float64)
        assert isinstance(se.act, nn.GELU) and isinstance(se.gate, nn.Hardsigmoid)
        assert se.fc1.weight.dtype == torch.float64
        x = torch.randn(2, 8, 3, 3, dtype=torch.float64)
        gate = torch.nn.functional.hardsigmoid(se.fc2(torch.nn.functional.gelu(se.fc1(x.mean((2, 3))))))
        torch.testing.assert_close(se(x), x * gate[:, :, None, None])

    def test_exception(self):
        with pytest.raises(ValueError, match="reduction must be a positive int, but got 0"):
            SEBlock(8, reduction=0)
        with pytest.raises(ValueError, match="channels must be a positive int"):
            SEBlock(0)
        with pytest.raises(ValueError, match="built for 8 channels, but the input has 6"):
            SEBlock(8)(torch.randn(1, 6, 2, 2))
        with pytest.raises(ValueError, match="2-D tensor"):
            SEBlock(8)(torch.randn(1, 8))

    @pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
    def test_input_of_another_dtype_is_a_type_error_that_names_both(self, dtype):
        # F.linear's own error ("mat1 and mat2 must have the same dtype") named neither tensor
        castable = dtype != torch.float64
        where = "outside torch.autocast" if castable else r"\(torch.autocast leaves float64 alone\)"
        with pytest.raises(TypeError, match=rf"^SEBlock's weights are torch.float32, so the input must be "
                           rf"torch.float32 {where}, but got {dtype}: convert one of them \(e.g. the block "
                           rf"with .to\({dtype}\)\)" + (", or run under torch.autocast$" if castable else "$")):
            SEBlock(8)(torch.randn(2, 8, 3, 3, dtype=dtype))

    def test_autocast_casts_the_input(self):
        se, x = SEBlock(8), torch.randn(2, 8, 3, 3)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = se(x.bfloat16())
        torch.testing.assert_close(out.float(), se(x), atol=0.05, rtol=0.05)

    def test_gradcheck_and_compile(self):
        se = SEBlock(4, reduction=2).double()
        x = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(se, (x,))
        torch.testing.assert_close(torch.compile(se, backend="eager")(x), se(x))


class TestInsertSE:
    def test_resnet_bottleneck_residual_branch(self):
        import torchvision

        net = torchvision.models.resnet50()
        assert insert_se_blocks(net, reduction=8) == 16
        block = net.layer1[0]
        assert isinstance(block.bn3, nn.Sequential) and isinstance(block.bn3[1], SEBlock)
        assert block.bn3[1].channels == 256 and block.bn3[1].hidden == 32
        net.eval()
        assert net(torch.randn(1, 3, 64, 64)).shape == (1, 1000)

    def test_resnet_se_is_applied(self):
        import torchvision

        net = torchvision.models.resnet18().eval()
        x = torch.randn(1, 3, 64, 64)
        before = net(x)
        insert_se_blocks(net)
        for module in net.modules():  # a gate of exactly 1 everywhere would make SE a no-op
            if isinstance(module, SEBlock):
                nn.init.constant_(module.fc2.bias, -2.0)
        assert not torch.allclose(net(x), before)

    def test_inception_v3_modules(self):
        import torchvision

        net = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False).eval()
        assert insert_se_blocks(net) == 11
        assert net.Mixed_7c[1].channels == 2048 and net.Mixed_6a[1].channels == 768
        assert net(torch.randn(1, 3, 96, 96)).shape == (1, 1000)

    def test_timm_inception_resnet_v2(self):
        import timm

        net = timm.create_model("inception_resnet_v2", features_only=True, out_indices=(-1,)).eval()
        assert insert_se_blocks(net) == 40
        assert net(torch.randn(1, 3, 96, 96))[-1].shape[1] == 1536

    @pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
    def test_new_blocks_match_dtype(self, dtype):
        import torchvision

        net = torchvision.models.resnet18().to(dtype).eval()
        insert_se_blocks(net)
        assert {p.dtype for p in net.parameters()} == {dtype}
        assert net(torch.randn(1, 3, 32, 32, dtype=dtype)).dtype == dtype

    def test_keeps_each_modules_training_mode(self):
        import torchvision

        net = torchvision.models.resnet18().train()
        net.layer1[0].bn2.eval()  # a frozen batch norm stays frozen
        insert_se_blocks(net)
        assert not net.layer1[0].bn2[0].training and not net.layer1[0].bn2[1].training
        assert net.layer2[0].bn2[1].training and net.training
        net = torchvision.models.resnet18().eval()
        insert_se_blocks(net)
        assert not any(m.training for m in net.modules())

    def test_only_once(self):
        import torchvision

        from bilinearpool import GAPClassifier

        net = torchvision.models.resnet18()
        GAPClassifier(net, node="layer4", num_classes=3, se_reduction=8)  # modifies net in place
        with pytest.raises(ValueError, match="ResNet already contains 8 SEBlocks: .*modified it in place"):
            GAPClassifier(net, node="layer4", num_classes=3, se_reduction=8)
        with pytest.raises(ValueError, match="already contains 8 SEBlocks"):
            insert_se_blocks(net)

    def test_not_a_module_is_a_type_error(self):
        """A name was read as a model ('str' object has no attribute 'modules')."""
        with pytest.raises(TypeError, match=r"^model must be an nn.Module \(modified in place\), but got str "
                           r"'resnet18'; build the model first .*build_backbone\('resnet18', se_reduction=8\)"):
            insert_se_blocks("resnet18")  # type: ignore[arg-type]
        with pytest.raises(TypeError, match=r"^model must be an nn.Module \(modified in place\), but got NoneType$"):
            insert_se_blocks(None)  # type: ignore[arg-type]

    def test_unsupported(self):
        with pytest.raises(ValueError, match=r"found no supported block \(ResNet.*contains \[.Conv2d."):
            insert_se_blocks(nn.Sequential(nn.Conv2d(3, 4, 3)))

    def test_resnet_with_other_norm_layers(self):
        import torchvision

        frozen = torchvision.models.resnet18(norm_layer=torchvision.ops.FrozenBatchNorm2d).eval()
        assert insert_se_blocks(frozen) == 8
        assert isinstance(frozen.layer1[0].bn2[1], SEBlock) and frozen.layer4[1].bn2[1].channels == 512
        groups = torchvision.models.resnet50(norm_layer=lambda c: nn.GroupNorm(8, c)).eval()
        assert insert_se_blocks(groups) == 16 and groups.layer4[2].bn3[1].channels == 2048
        assert groups(torch.randn(1, 3, 32, 32)).shape == (1, 1000)

    def test_timm_inception_v3_modules_but_not_inception_v4(self):
        import timm

        net = timm.create_model("inception_v3", features_only=True, out_indices=(-1,)).eval()
        assert insert_se_blocks(net) == 11
        assert net.Mixed_7c[1].channels == 2048
        assert net(torch.randn(1, 3, 96, 96))[-1].shape[1] == 2048
        # Inception-v4's InceptionA/B/C share the names, not the branches: not touched.
        with pytest.raises(ValueError, match="found no supported block"):
            insert_se_blocks(timm.create_model("inception_v4"))

    def test_feature_extractor_says_to_insert_before_cutting(self):
        """A feature extractor's blocks are plain Modules (torch.fx): the message listed
        'ResNet' among the types and left the user guessing."""
        from bilinearpool import build_backbone

        with pytest.raises(ValueError, match=r"found no supported block .*it is a feature extractor "
                           r"\(torch.fx\).*build_backbone\(..., se_reduction=r\)"):
            insert_se_blocks(build_backbone("resnet18"))
        with pytest.raises(ValueError, match=r"found no supported block .*contains \[.Conv2d.\]$"):
            insert_se_blocks(torch.nn.Conv2d(3, 4, 1))  # a plain model: no such advice
        with pytest.raises(ValueError, match=r"found no supported block") as info:
            insert_se_blocks(build_backbone("vgg11"))  # cut or not, VGG takes none
        assert "feature extractor" not in str(info.value)

    @pytest.mark.parametrize("name, attention", [("seresnet18", "SEModule"), ("ecaresnet26t", "EcaModule")])
    def test_blocks_with_their_own_attention_are_refused(self, name, attention):
        import timm

        net = timm.create_model(name)
        before = [type(m).__name__ for m in net.modules()]
        with pytest.raises(ValueError, match=rf"channel attention of their own \(e\.g\. layer1\.0\.se \({attention}\)"):
            insert_se_blocks(net)
        assert [type(m).__name__ for m in net.modules()] == before  # nothing inserted

    def test_layer_factories_are_checked(self):
        with pytest.raises(TypeError, match=r"act_layer must be a factory .*\(e\.g\. nn\.ReLU\), but got ReLU\(\)"):
            SEBlock(16, act_layer=nn.ReLU())  # type: ignore[arg-type]
        with pytest.raises(TypeError, match=r"gate_layer must be a factory .* calling .*sigmoid.* without arguments failed"):
            SEBlock(16, gate_layer=torch.sigmoid)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match=r"gate_layer must be a factory .* returned int"):
            SEBlock(16, gate_layer=lambda: 3)  # type: ignore[arg-type,return-value]
        assert isinstance(SEBlock(16, act_layer=lambda: nn.GELU()).act, nn.GELU)
