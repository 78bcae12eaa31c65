#version 330
// Draws the output into the window through the room's corrections (engine/render/output.py):
// flips, rotation, letterbox or stretch, keystone, master fade. The CPU folds all of them
// into one projective matrix from window point to image point; black outside the image.
// Both points are top-left based, y down; the window's uv is y up, so flip here, only here.
uniform sampler2D u_input;
uniform mat3 u_window_to_image;
uniform float u_master;
in vec2 uv;
out vec4 frag;
void main() {
    vec3 p = u_window_to_image * vec3(uv.x, 1.0 - uv.y, 1.0);
    vec2 st = p.xy / p.z;
    // p.z <= 0: beyond the keystone's horizon, a point that maps onto no part of the picture
    bool inside = p.z > 0.0 && all(greaterThanEqual(st, vec2(0.0))) && all(lessThanEqual(st, vec2(1.0)));
    frag = inside ? vec4(texture(u_input, st).rgb * u_master, 1.0) : vec4(0.0, 0.0, 0.0, 1.0);
}
