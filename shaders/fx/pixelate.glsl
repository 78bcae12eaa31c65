// Pixelate into square cells of `size` output pixels. Identity: size 1.
uniform float u_pixelate_size;

vec2 fx_pixelate(vec2 p) {
    vec2 cell = vec2(max(u_pixelate_size, 1.0));
    return (floor(p * u_resolution / cell) * cell + cell * 0.5) / u_resolution;
}
