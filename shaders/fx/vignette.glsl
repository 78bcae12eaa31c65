// Darkens the corners. Identity: amount 0.
uniform float u_vignette_amount;
uniform float u_vignette_softness;

vec3 fx_vignette(vec3 c, vec2 p) {
    vec2 q = (p - 0.5) * vec2(u_resolution.x / u_resolution.y, 1.0);
    float edge = smoothstep(0.75, 0.75 - max(u_vignette_softness, 0.001), length(q));
    return c * mix(1.0, edge, u_vignette_amount);
}
